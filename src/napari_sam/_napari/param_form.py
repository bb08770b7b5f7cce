"""A group box of parameter fields (spin boxes, check boxes) with tooltips, read as a dict."""

from __future__ import annotations

import dataclasses

from qtpy.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QSpinBox,
)

# name: (minimum, maximum, step or None for ints, help); bools need only (None, None, None, help)
Spec = dict[str, tuple]


class ParamForm(QGroupBox):
    """Fields for ``spec`` ({name: (min, max, step, help)}) with ``defaults`` ({name: value});
    ints get a spin box, floats a decimal spin box, bools a check box."""

    def __init__(self, title: str, spec: Spec, defaults: dict) -> None:
        super().__init__(title)
        form = QFormLayout(self)
        self.fields: dict[str, QSpinBox | QDoubleSpinBox | QCheckBox] = {}
        for name, (lo, hi, step, help_text) in spec.items():
            default = defaults[name]
            if isinstance(default, bool):
                field = QCheckBox()
                field.setChecked(default)
            elif step is None:
                field = QSpinBox()
                field.setRange(lo, hi)
                field.setValue(default)
            else:
                field = QDoubleSpinBox()
                field.setDecimals(2)
                field.setSingleStep(step)
                field.setRange(lo, hi)
                field.setValue(default)
            field.setToolTip(help_text)
            label = QLabel(name.replace("_", " "))
            label.setToolTip(help_text)
            form.addRow(label, field)
            self.fields[name] = field

    @classmethod
    def for_dataclass(cls, title: str, params_type, spec: Spec) -> ParamForm:
        """Fields for the dataclass ``params_type``'s fields named in ``spec``, its defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(params_type)}
        missing = [name for name in spec if name not in defaults]
        if missing:
            raise ValueError(f"expected fields of {params_type.__name__}, got {missing}")
        return cls(title, spec, defaults)

    def values(self) -> dict:
        return {name: (f.isChecked() if isinstance(f, QCheckBox) else f.value())
                for name, f in self.fields.items()}

    def set(self, name: str, value) -> None:
        """Set one field; ValueError for a value it cannot hold (out of range, too many
        decimals) instead of Qt's silent clamping and rounding."""
        field = self.fields[name]
        if isinstance(field, QCheckBox):
            field.setChecked(bool(value))
            return
        lo, hi = field.minimum(), field.maximum()
        decimals = field.decimals() if isinstance(field, QDoubleSpinBox) else 0
        if not lo <= value <= hi or round(value, decimals) != value:
            kind = f"a number with at most {decimals} decimals" if decimals else "a whole number"
            raise ValueError(f"expected {name} = {kind} in [{lo:g}, {hi:g}], got {value!r}")
        field.setValue(value)
