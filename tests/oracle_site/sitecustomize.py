"""Test-only: the oracle model in processes the tests start (the installed ``napari-sam``
and the Dask workers it starts), where monkeypatching cannot reach.

With this folder on PYTHONPATH and ``NAPARI_SAM_ORACLE=S`` set, every model napari-sam
builds is ``OracleSam(S)`` with its AIS decoder (tests/oracle.py); the CLI, the cluster,
the stores and the engine stay real. ``NAPARI_SAM_ORACLE_DELAY=SECONDS`` makes each AIS
decoder call that much slower (a task long enough to kill a worker in it).
"""

import os

if os.environ.get("NAPARI_SAM_ORACLE"):
    import sys
    import time

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    from oracle import OracleInstanceDecoder, OracleSam

    import napari_sam.engine
    import napari_sam.engine.build

    class _SlowDecoder(OracleInstanceDecoder):
        def __call__(self, *args, **kwargs):
            time.sleep(float(os.environ.get("NAPARI_SAM_ORACLE_DELAY", "0")))
            return super().__call__(*args, **kwargs)

    def _oracle_build_sam(*args, **kwargs):
        model = OracleSam(int(os.environ["NAPARI_SAM_ORACLE"]))
        model.instance_decoder = _SlowDecoder(model)
        return model

    napari_sam.engine.build.build_sam = napari_sam.engine.build_sam = _oracle_build_sam
