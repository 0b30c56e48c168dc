"""The nearest other spot of every spot, the one DISTL's k-d tree (ANN's, through cctbx's AnnAdaptor) finds.

Spot centres are whole pixels, so a spot often has two neighbours at exactly the same distance, and which
of them is taken matters: the vector to it feeds the lattice-vector histogram and the close-spot test of
the heuristics.  ANN keeps the first of equally near points it meets, and the order it meets them in comes
from how its tree is cut; another k-d tree (scipy's) picks a different one in about 2 of 3 such ties.  So
this module builds the tree ANN builds for cctbx's adaptor (one point a leaf, sliding-midpoint cuts) and
searches it in ANN's order (nearer child first, the farther one only when its cell is strictly nearer
than the best so far), excluding points at distance 0 as cctbx's build of ANN does.  It also spares the
analysis scipy, whose import took 0.15 s of every one-shot command.
"""
from __future__ import annotations

import numpy as np

from .jit import njit

ALMOST = 1.0 - 0.001  # a side is "among the longest" when at least this fraction of the longest
LEAF = -1  # cut_dim of a leaf node


def nearest_others(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point of ``points`` (n, 2), the index of the nearest other point at a positive distance and
    that squared distance; -1 and inf where there is none."""
    points = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 2)
    return _nearest_others(points)


@njit(cache=True)
def _nearest_others(points):
    n = points.shape[0]
    index = np.full(n, -1, dtype=np.int64)
    dist2 = np.full(n, np.inf)
    if n == 0:
        return index, dist2
    box_lo = np.array([points[:, 0].min(), points[:, 1].min()])  # the root's cell: the points' bounding box
    box_hi = np.array([points[:, 0].max(), points[:, 1].max()])
    cut_dim, cut_val, bounds, children, leaf_point = _build(points, box_lo, box_hi)
    stack_node = np.empty(2 * n + 2, dtype=np.int64)
    stack_dist = np.empty(2 * n + 2)
    stack_back = np.empty(2 * n + 2, dtype=np.bool_)
    for q in range(n):
        index[q], dist2[q] = _search(points, points[q, 0], points[q, 1], box_lo, box_hi, cut_dim, cut_val, bounds,
                                     children, leaf_point, stack_node, stack_dist, stack_back)
    return index, dist2


@njit(cache=True)
def _build(points, box_lo, box_hi):
    """The tree, as arrays by node (node 0 the root, whose cell is box_lo..box_hi): the cut's dimension (LEAF
    for a leaf) and value, the node's cell bounds along that dimension, the low and high children, and a
    leaf's point."""
    n = points.shape[0]
    nodes = 2 * n - 1
    cut_dim = np.full(nodes, LEAF, dtype=np.int64)
    cut_val = np.zeros(nodes)
    bounds = np.zeros((nodes, 2))
    children = np.full((nodes, 2), -1, dtype=np.int64)
    leaf_point = np.full(nodes, -1, dtype=np.int64)
    order = np.arange(n)  # permuted in place as ANN permutes its index array
    # pending nodes: id, first and count of their points in ``order``, and their cell (lo x, lo y, hi x, hi y)
    pending = np.empty((nodes, 3), dtype=np.int64)
    cells = np.empty((nodes, 4))
    pending[0, 0], pending[0, 1], pending[0, 2] = 0, 0, n
    cells[0, 0], cells[0, 1], cells[0, 2], cells[0, 3] = box_lo[0], box_lo[1], box_hi[0], box_hi[1]
    top, used = 1, 1
    while top > 0:
        top -= 1
        node, first, count = pending[top, 0], pending[top, 1], pending[top, 2]
        lo = cells[top, 0:2].copy()
        hi = cells[top, 2:4].copy()
        if count == 1:
            leaf_point[node] = order[first]
            continue
        part = order[first:first + count]
        d, value, n_lo = _split(points, part, lo, hi)
        cut_dim[node], cut_val[node] = d, value
        bounds[node, 0], bounds[node, 1] = lo[d], hi[d]
        low, high = used, used + 1
        used += 2
        children[node, 0], children[node, 1] = low, high
        for child, start, size, side in ((low, first, n_lo, 1), (high, first + n_lo, count - n_lo, 0)):
            pending[top, 0], pending[top, 1], pending[top, 2] = child, start, size
            cells[top, 0], cells[top, 1], cells[top, 2], cells[top, 3] = lo[0], lo[1], hi[0], hi[1]
            cells[top, 2 * side + d] = value  # the low child's upper bound, the high child's lower one
            top += 1
    return cut_dim, cut_val, bounds, children, leaf_point


@njit(cache=True)
def _split(points, part, lo, hi):
    """ANN's sliding-midpoint cut of a cell holding ``part`` (point indices, permuted in place so that the
    low side comes first): the dimension, the value and the number of points on the low side."""
    longest = hi[0] - lo[0]
    if hi[1] - lo[1] > longest:
        longest = hi[1] - lo[1]
    d = 0
    smallest = largest = 0.0
    widest = -1.0
    for k in range(2):  # among the longest sides, the one the points spread most along; the first on a tie
        if hi[k] - lo[k] >= ALMOST * longest:  # the longest side always is: some k is taken
            low, high = _extent(points, part, k)
            if high - low > widest:
                widest, d, smallest, largest = high - low, k, low, high
    ideal = (lo[d] + hi[d]) / 2
    value = smallest if ideal < smallest else largest if ideal > largest else ideal
    below, through = _plane_split(points, part, d, value)
    n, half = part.size, part.size // 2
    if ideal < smallest:
        n_lo = 1
    elif ideal > largest:
        n_lo = n - 1
    elif below > half:
        n_lo = below
    elif through < half:
        n_lo = through
    else:
        n_lo = half
    return d, value, n_lo


@njit(cache=True)
def _extent(points, part, k):
    """The smallest and the largest coordinate k of the points ``part``."""
    smallest = largest = points[part[0], k]
    for i in range(1, part.size):
        smallest = min(smallest, points[part[i], k])
        largest = max(largest, points[part[i], k])
    return smallest, largest


@njit(cache=True)
def _plane_split(points, part, d, value):
    """Permute ``part`` into points below ``value`` along d, then equal to it, then above, by ANN's two
    swapping sweeps from both ends (the permutation decides which leaves tied points land in); returns
    where the equal and the above runs start."""
    below = _sweep(points, part, d, value, 0, False)
    return below, _sweep(points, part, d, value, below, True)


@njit(cache=True)
def _sweep(points, part, d, value, left, or_equal):
    """Move the points of part[left:] below ``value`` (or equal to it) to its front, swapping the first one
    that is not from the left with the last one that is from the right; returns where the others start."""
    low, right = left, part.size - 1
    while True:
        while left < part.size and (points[part[left], d] <= value if or_equal else points[part[left], d] < value):
            left += 1
        while right >= low and not (points[part[right], d] <= value if or_equal else points[part[right], d] < value):
            right -= 1
        if left > right:
            return left
        part[left], part[right] = part[right], part[left]
        left += 1
        right -= 1


@njit(cache=True)
def _search(points, qx, qy, box_lo, box_hi, cut_dim, cut_val, bounds, children, leaf_point, stack_node,
            stack_dist, stack_back):
    """The nearest point to (qx, qy) at a positive distance, visiting nodes in ANN's order: at a cut the
    child on the query's side first, then the other one if its cell is strictly nearer than the best point
    so far; of equally near points the first met stays."""
    q = (qx, qy)
    dist = 0.0  # squared distance from the query to the root's cell
    for k in range(2):
        if q[k] < box_lo[k]:
            dist += (box_lo[k] - q[k]) * (box_lo[k] - q[k])
        elif q[k] > box_hi[k]:
            dist += (q[k] - box_hi[k]) * (q[k] - box_hi[k])
    best, best_index = np.inf, -1
    stack_node[0], stack_dist[0], stack_back[0] = 0, dist, False
    top = 1
    while top > 0:
        top -= 1
        node, box_dist, back = stack_node[top], stack_dist[top], stack_back[top]
        d = cut_dim[node]
        if d == LEAF:
            p = leaf_point[node]
            tx = qx - points[p, 0]
            squared = tx * tx
            if squared > best:
                continue
            ty = qy - points[p, 1]
            squared += ty * ty
            if squared != 0.0 and squared < best:
                best, best_index = squared, p
            continue
        cut_diff = q[d] - cut_val[node]
        near, far = (0, 1) if cut_diff < 0 else (1, 0)
        if not back:  # visit the near child, then come back here for the far one
            stack_node[top], stack_dist[top], stack_back[top] = node, box_dist, True
            stack_node[top + 1], stack_dist[top + 1], stack_back[top + 1] = children[node, near], box_dist, False
            top += 2
            continue
        # the far cell's distance: the query's offset along d from this cell's bound is replaced by its
        # offset from the cut
        box_diff = bounds[node, 0] - q[d] if near == 0 else q[d] - bounds[node, 1]
        if box_diff < 0:
            box_diff = 0.0
        box_dist = box_dist + (cut_diff * cut_diff - box_diff * box_diff)
        if box_dist < best:
            stack_node[top], stack_dist[top], stack_back[top] = children[node, far], box_dist, False
            top += 1
    return best_index, best
