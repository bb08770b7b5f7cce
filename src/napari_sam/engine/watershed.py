"""Seeded watershed (Meyer flooding, 4-connectivity) without a priority queue.

:func:`seeded_watershed` equals ``skimage.segmentation.watershed(heights, markers,
mask=mask)`` pixel for pixel (up to ties between equal heights) and is faster on the AIS
decoder's smooth distance maps: each pixel follows its steepest-descent chain to a seed
(pointer doubling), flat stretches are crossed breadth first, pits without a seed are
filled over their lowest pass, and scikit-image only floods what is left ("lakes").
Used by :mod:`.instance_segmentation`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from skimage.segmentation import watershed

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


_NO_KEY = np.uint32(0xFFFFFFFF)  # "no neighbour here": above every height key


def _height_keys(heights: np.ndarray) -> np.ndarray:
    """(…) uint32 sort keys: float32 bits << 2, order-preserving for heights in [0, 2)
    (bits < 2**30; smoothing [0, 1] maps may overshoot 1 by a rounding error), with two
    free low bits for a neighbour's direction."""
    return (heights + np.float32(0)).view(np.uint32) << np.uint32(2)  # + 0: -0.0 -> +0.0


def _lowest_neighbours(framed: np.ndarray, nodes: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(N,) uint32: least key among the 4-neighbours of ``nodes`` (flat indices into the
    framed key image ``framed``, (H + 2) x (W + 2); ``pixels``: the same in (H, W)), its
    direction (0 up, 1 down, 2 left, 3 right) in the low two bits; ties go to the first."""
    stride = framed.shape[1]
    if nodes.size > framed.size // 3:  # dense: whole shifted images beat four gathers
        low = framed[:-2, 1:-1] | np.uint32(0)
        np.minimum(low, framed[2:, 1:-1] | np.uint32(1), out=low)
        np.minimum(low, framed[1:-1, :-2] | np.uint32(2), out=low)
        np.minimum(low, framed[1:-1, 2:] | np.uint32(3), out=low)
        return low.ravel()[pixels]
    flat = framed.ravel()
    low = flat[nodes - stride]
    for direction, offset in ((1, stride), (2, -1), (3, 1)):
        np.minimum(low, flat[nodes + offset] | np.uint32(direction), out=low)
    return low


def _to_roots(parent: np.ndarray, active: np.ndarray, max_steps: int = 64) -> np.ndarray:
    """Pointer doubling in place: ``parent[i]`` -> root of its chain for i in ``active``.
    Returns the indices still unresolved after ``max_steps`` (only on a cycle)."""
    for _ in range(max_steps):
        if not active.size:
            break
        step = parent[active]
        jump = parent[step]
        moved = jump != step
        active = active[moved]
        parent[active] = jump[moved]
    return active


def seeded_watershed(heights: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed: Meyer flooding of ``heights`` from ``markers`` inside ``mask``.

    Args:
        heights: (H, W) float32 in [0, 1].
        markers: (H, W) int32, 0 = no seed; every seed pixel lies in ``mask``.
        mask: (H, W) bool; flooding stays inside it (4-connectivity).

    Returns:
        (H, W) int32 labels, 0 outside ``mask`` and where no seed reaches.

    Equals ``skimage.segmentation.watershed(heights, markers, mask=mask)`` (which floods with
    a priority queue) up to ties between equal heights, without a queue. In a flooding a
    pixel takes the label of the neighbour flooded first: the one of least flood level R
    (the least, over paths from a seed, of the highest height on the path; R >= height).

    1. Steepest descent: every pixel points to its lowest 4-neighbour if that is strictly
       lower. Along a chain that ends in a seed nothing climbs, so R = height there and the
       lowest neighbour is the one of least R: such pixels take their chain's seed label
       (pointer doubling resolves all chains at once).
    2. Chains ending in a pit (a local minimum without seed) form the pit's catchment. Water
       reaches a catchment over its lowest pass: its level is a minimax ("bottleneck") path
       problem on the small graph of catchments, solved by a minimum spanning tree from the
       seeded catchments. Below that level the catchment is a lake filled from its entry
       pixel; above it R = height again, and step 1 is repeated with R instead of heights.
    """
    height, width = heights.shape
    keys = _height_keys(heights)
    framed = np.full((height + 2, width + 2), _NO_KEY, np.uint32)  # a frame of "no neighbour"
    np.copyto(framed[1:-1, 1:-1], keys, where=mask)
    pixels = np.flatnonzero(mask)
    if not pixels.size:
        return np.zeros((height, width), np.int32)
    nodes = pixels + 2 * (pixels // width) + width + 3  # the same pixels in the framed image
    lowest = _lowest_neighbours(framed, nodes, pixels)
    own = keys.ravel()[pixels]
    flat_markers = markers.ravel()
    free = flat_markers[pixels] == 0
    descends = np.flatnonzero((lowest < own) & free)
    parent = np.arange(height * width, dtype=np.int64)
    movers = pixels[descends]
    parent[movers] = movers + np.array([-width, width, -1, 1])[lowest[descends] & np.uint32(3)]
    flat = np.flatnonzero(free & (lowest >> np.uint32(2) == own >> np.uint32(2)))  # plateaus
    if flat.size:
        movers = np.concatenate([movers, _cross_plateaus(parent, framed, nodes[flat])])
    first_parent = parent[pixels]  # (stage 2 needs the immediate parents of pit pixels)
    _to_roots(parent, movers)
    labels = np.zeros(height * width, np.int32)
    labels[pixels] = flat_markers[parent[pixels]]  # 0 where a chain ends in a pit
    pits = labels[pixels] == 0
    if pits.any():
        first = parent.copy()
        first[pixels] = first_parent
        _fill_catchments(heights.ravel(), mask, labels, parent, first, pixels[pits], framed, flat_markers)
    return labels.reshape(height, width)


def _pixel_of(node: np.ndarray, stride: int) -> np.ndarray:
    """Flat (H, W) index of a flat index into the framed (H + 2, W + 2) image."""
    inner = node - stride - 1  # = row * stride + col
    return inner - 2 * (inner // stride)


def _cross_plateaus(parent, framed, nodes) -> np.ndarray:
    """Flat stretches: pixels with an equal 4-neighbour and none lower (``nodes``, flat
    indices into ``framed``) point, breadth first, to an equal neighbour nearer the
    stretch's way down, as a first-in-first-out flooding reaches them. A stretch without a
    way down (a flat pit) hangs on its first pixel. Sets ``parent`` (flat (H, W) indices);
    returns the pixels that were given one."""
    stride = framed.shape[1]
    keys = framed.ravel()
    waiting = np.zeros(framed.size, bool)  # no way down found yet
    waiting[nodes] = True
    offsets = (-stride, stride, -1, 1)
    given = []
    # round 0: next to an equal pixel off the stretch (which goes down, or is a seed)
    children, targets = [], []
    for offset in offsets:
        ok = waiting[nodes] & ~waiting[nodes + offset] & (keys[nodes + offset] == keys[nodes])
        children.append(nodes[ok])
        targets.append(nodes[ok] + offset)
        waiting[nodes[ok]] = False
    while True:
        child = np.concatenate(children)
        if not child.size:
            break
        parent[_pixel_of(child, stride)] = _pixel_of(np.concatenate(targets), stride)
        given.append(_pixel_of(child, stride))
        children, targets = [], []  # next round: next to a pixel of the last round
        for offset in offsets:
            ok = waiting[child + offset] & (keys[child + offset] == keys[child])
            children.append(child[ok] + offset)
            targets.append(child[ok])
            waiting[child[ok] + offset] = False
    rest = nodes[waiting[nodes]]
    if rest.size:  # flat pits: each 4-connected stretch hangs on its first pixel
        grid = np.zeros(framed.shape, bool)
        grid.ravel()[rest] = True
        stretch = ndimage.label(grid, _FOUR_CONNECTED)[0].ravel()[rest]
        first = np.full(stretch.max() + 1, framed.size)
        np.minimum.at(first, stretch, rest)
        parent[_pixel_of(rest, stride)] = _pixel_of(first[stretch], stride)
        given.append(_pixel_of(rest, stride))
    return np.concatenate(given) if given else np.zeros(0, np.int64)


def _fill_catchments(heights, mask, labels, parent, first_parent, pits, framed, flat_markers) -> None:
    """Step 2 of :func:`seeded_watershed`, in place on the flat ``labels`` and ``parent``.

    ``pits``: (P,) flat indices of the unlabelled mask pixels (whose chain ends in a pit);
    ``parent``: the chains' roots, already doubled; ``first_parent``: before doubling."""
    height, width = mask.shape
    stride = width + 2
    # Catchments 0..C-1, one per pit; -1 for labelled pixels (and outside the mask).
    roots = parent[pits]
    is_root = np.zeros(heights.size, bool)
    is_root[roots] = True
    count = int(is_root.sum())
    catchment = np.full(heights.size, -1, np.int32)
    catchment[pits] = (np.cumsum(is_root, dtype=np.int32) - 1)[roots]
    # Pixel pairs across a catchment border, each with its pit-catchment side "inside".
    grid = catchment.reshape(height, width)
    inside, outside = [], []
    for a, b, step in ((np.s_[:, :-1], np.s_[:, 1:], 1), (np.s_[:-1, :], np.s_[1:, :], width)):
        cross = mask[a] & mask[b] & (grid[a] != grid[b])
        first = np.flatnonzero(cross)
        first += first // (width - 1) if step == 1 else 0  # index into (H, W), not (H, W - 1)
        second = first + step
        for p, q in ((first, second), (second, first)):
            keep = catchment[p] >= 0
            inside.append(p[keep])
            outside.append(q[keep])
    inside, outside = np.concatenate(inside), np.concatenate(outside)
    basin = catchment[inside]
    other = np.where(catchment[outside] >= 0, catchment[outside], count)  # count: labelled
    # Bottleneck levels: minimum spanning tree of the catchment graph, from node `count`.
    # One sort of (edge, weight) keys; the first of each edge is its lightest pair.
    low, high = np.minimum(basin, other), np.maximum(basin, other)
    edge = low.astype(np.uint64) * np.uint64(count + 1) + high.astype(np.uint64)
    pair_weight = np.maximum(heights[inside], heights[outside])
    sorted_keys = np.sort((edge << np.uint64(32)) | _height_keys(pair_weight).astype(np.uint64) >> np.uint64(2))
    edge = sorted_keys >> np.uint64(32)
    first = np.flatnonzero(np.diff(edge, prepend=np.uint64(edge.max(initial=0) + 1)) != 0)
    weight = (sorted_keys[first] & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.float32)
    edge = edge[first].astype(np.int64)
    graph = sparse.coo_matrix(
        (weight.astype(np.float64) + 1.0, (edge // (count + 1), edge % (count + 1))),  # > 0
        shape=(count + 1,) * 2,
    )
    tree = csgraph.minimum_spanning_tree(graph).tocoo()
    visit, previous = csgraph.breadth_first_order(tree, count, directed=False, return_predecessors=True)
    visit = visit[1:]
    # weight of each tree edge (previous -> node), whichever way round the tree stores it
    tree_edge = np.concatenate([tree.row * (count + 1) + tree.col, tree.col * (count + 1) + tree.row])
    tree_data = np.concatenate([tree.data, tree.data])
    sorter = np.argsort(tree_edge)
    where = sorter[np.searchsorted(tree_edge, previous[visit] * (count + 1) + visit, sorter=sorter)]
    tree_weight = (tree_data[where] - 1.0).tolist()
    levels = [np.inf] * count + [-np.inf]  # reached catchments only get a finite level
    for node, before, w in zip(visit.tolist(), previous[visit].tolist(), tree_weight):
        levels[node] = max(levels[before], w)
    level = np.array(levels[:count])
    reached = np.isfinite(level)
    # Flood level R of every pit pixel (height above the lake level, the level below it).
    pit_height = heights[pits]
    flood_level = heights.copy()
    flood_level[pits] = np.maximum(pit_height, np.where(reached, level, 0.0)[catchment[pits]])
    # Each lake's entry: the cheapest pair into it, then the neighbour flooded first, then
    # (for ties) the spanning tree's predecessor, which rules out cycles.
    cost = np.maximum(flood_level[outside], heights[inside])
    candidate = np.flatnonzero(reached[basin] & (cost == np.where(reached, level, np.nan)[basin]))
    detour = other[candidate] != previous[basin[candidate]]
    pick = candidate[np.lexsort((detour, flood_level[outside[candidate]], basin[candidate]))]
    lakes, first = np.unique(basin[pick], return_index=True)
    entry = np.full(count, -1, np.int64)
    entry[lakes] = outside[pick[first]]
    # New parents: lake pixels -> their lake's entry; slope pixels -> lowest neighbour in R;
    # pixels no seed reaches -> themselves (label 0).
    pit_catchment = catchment[pits]
    alone = ~reached[pit_catchment]
    under = ~alone & (pit_height <= level[pit_catchment])
    parent[pits[under]] = entry[pit_catchment[under]]
    slope = np.flatnonzero(~alone & ~under)
    if slope.size:
        framed_level = framed.copy()
        pit_nodes = pits + 2 * (pits // width) + stride + 1
        framed_level.ravel()[pit_nodes] = _height_keys(flood_level[pits])
        lowest = _lowest_neighbours(framed_level, pit_nodes[slope], pits[slope])
        down = lowest < _height_keys(flood_level[pits[slope]])
        step = np.array([-width, width, -1, 1])[lowest & np.uint32(3)]
        # R = height on the slope, so its steepest neighbour (R = max(height, lake level))
        # is lower in R; only on a flat stretch is none lower: keep the way across it.
        parent[pits[slope]] = np.where(down, pits[slope] + step, first_parent[pits[slope]])
    parent[pits[alone]] = pits[alone]
    broken = pits[under][entry[pit_catchment[under]] < 0]  # no entry found: cannot happen
    parent[broken] = broken
    cycles = _to_roots(parent, pits.copy())
    labels[pits] = flat_markers[parent[pits]]
    cycles = np.concatenate([cycles, broken])
    if cycles.size:  # only possible through exact ties: let scikit-image flood those
        _flood_lakes(heights.reshape(height, width), labels.reshape(height, width), cycles, mask)


def _flood_lakes(heights: np.ndarray, labels: np.ndarray, pixels: np.ndarray, mask: np.ndarray) -> None:
    """Fallback: relabel the 4-connected unlabelled regions around ``pixels`` with
    scikit-image's watershed on their box, seeded by their labelled 4-neighbours."""
    labels.ravel()[pixels] = 0
    lakes = mask & (labels == 0)
    components, _ = ndimage.label(lakes, _FOUR_CONNECTED)
    boxes = ndimage.find_objects(components)
    wanted = np.unique(components.ravel()[pixels])
    for index in wanted[wanted > 0].tolist():
        rows, cols = boxes[index - 1]
        box = np.s_[max(rows.start - 1, 0):rows.stop + 1, max(cols.start - 1, 0):cols.stop + 1]
        lake = components[box] == index
        shore = ndimage.binary_dilation(lake, _FOUR_CONNECTED) & (labels[box] > 0)
        flooded = watershed(heights[box], np.where(shore, labels[box], 0), mask=lake | shore)
        labels[box][lake] = flooded[lake]
