"""Item-to-item weights by EASE (Steck, "Embarrassingly Shallow Autoencoders", WWW '19) over
co-occurrence counted along the stream: the serving blend's ``neighbours`` signal and the ``ease``
baseline (issue 20).

``Cooccurrence`` is the running Gram matrix G of the users × items matrix: each applied event of item
i adds 1 to G[i, i] and, for every other distinct item j among the user's ``window`` items before it,
1 to G[i, j] and G[j, i]. Counted along the stream it keeps the pairs of a user's older items too, which a
recount from the recent items alone would have dropped (ml-100k, validation slice: 0.057 against
0.046). ``weights`` solves EASE among the EASE_ITEMS most counted items:

    P = (G + λI)⁻¹,   B[j, i] = −P[j, i] / P[i, i] (j ≠ i),   B[i, i] = 0

B[j, i] is how much holding j says about i once every other item the user holds is accounted for: a
popular item that co-occurs with everything gets little weight, unlike a plain count or cosine. A
user's score of i is Σ B[j, i] over their last NEAR items j (``Signals.near``).

λ, the scale and EASE_ITEMS were chosen on validation slices only (ml-100k's first 15,000 events,
synthetic seed 1): λ from 200 to 2,000 scored within one standard error of each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
from scipy import sparse

from model.blend import RunningPairs, list_array, rows_of

EASE_ITEMS = 2048  # solved among this many most counted items: a dense items² inverse (2048: ~1 s, 32 MiB)
# G keeps this many most counted items: at most PAIR_ITEMS² pairs (~200 MiB), whatever the catalogue.
PAIR_ITEMS = 2 * EASE_ITEMS
SOLVE_BLOCK = 256  # rows of B searched for their heaviest weights at once
ADD_BLOCK = 8192  # events paired at once: an [events, window] array of positions (~3 MiB at window 49)
EASE_L2 = 500.0  # λ
# B sums over NEAR items are ~0.1–1, the cosine sums the blend's grid was laid out for ~1–10; ×30 puts
# them on that grid (×10, ×30, ×100 scored alike on validation).
EASE_SCALE = 30.0


class Cooccurrence(RunningPairs):
    """The running G (the module doc), rows and columns by first sight."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    @classmethod
    def count(cls, sequences: Iterable[Sequence[str]] | pa.Array | pa.ChunkedArray, window: int) -> Cooccurrence:
        """G over users' recent items as they stand (a start): Xᵀ X of the binary users × items matrix,
        which is what adding each list's events one by one gives when no list holds more than ``window``
        + 1 items and none repeats within a list."""
        lists = list_array(sequences)
        out = cls(window)
        code, owner = out.encode(lists)
        if not len(code):
            return out
        held = sparse.csr_matrix((np.ones(len(code)), (owner, code)), shape=(len(lists), len(out.names)))
        held.sum_duplicates()
        held.data[:] = 1.0  # a user holds an item or not
        out.matrix = (held.T @ held).tocsr()
        return out

    def add(self, recents: Sequence[Sequence[str]], news: Sequence[int]) -> None:
        """Count each user's ``news[u]`` newest events, ``recents[u]`` being their newest items (oldest
        first, the new ones last): each event pairs with the distinct items among the ``window`` before
        it in its list. Every event of the call at once, in numpy (ADD_BLOCK events at a time): the
        worker counts each event of the stream here, and a call per user or per event cost 13–40 µs an
        event in Python or numpy overhead."""
        lengths = np.array([len(r) for r in recents], dtype=np.int64)
        news = np.minimum(np.asarray(news, dtype=np.int64), lengths)
        codes = np.array([self.code_of(i) for r in recents for i in r], dtype=np.int64)
        first = np.cumsum(lengths) - lengths  # each list's first position in ``codes``
        owner = np.repeat(np.arange(len(recents)), news)  # [E]: the list of each new event
        at = np.arange(len(owner)) - np.repeat(np.cumsum(news) - news, news) + np.repeat(lengths - news, news)
        for start in range(0, len(owner), ADD_BLOCK):
            user, pos = owner[start : start + ADD_BLOCK], at[start : start + ADD_BLOCK]  # pos: within its list
            back = pos[:, None] - np.arange(1, self.window + 1)[None, :]  # [E, window]
            item = codes[first[user] + pos]
            before = np.where(back >= 0, codes[first[user][:, None] + np.maximum(back, 0)], -1)
            before[before == item[:, None]] = -1  # never with itself
            before.sort(axis=1)
            before[:, 1:][before[:, 1:] == before[:, :-1]] = -1  # each distinct item once
            event, slot = np.nonzero(before >= 0)
            j, i = before[event, slot], item[event]
            self._blocks.append((np.concatenate([item, i, j]), np.concatenate([item, j, i])))

    def merge(self) -> None:
        """The pairs added so far folded in; then, past PAIR_ITEMS items, only the most counted kept (an
        item left out is counted again from its next event: by then it is no longer among them)."""
        super().merge()
        if len(self.names) > PAIR_ITEMS:
            kept = np.sort(np.argsort(-self.matrix.diagonal(), kind="stable")[:PAIR_ITEMS])
            self.matrix = self.matrix[kept][:, kept].tocsr()
            self.names = [self.names[k] for k in kept]
            self.code = {name: c for c, name in enumerate(self.names)}

    def weights(self, keep: int) -> dict[str, dict[str, float]]:
        """{j: its ``keep`` heaviest items i: EASE_SCALE · B[j, i] > 0}, heaviest first, ties by id; B
        solved among the EASE_ITEMS most counted items (ties by id)."""
        self.merge()
        n = len(self.names)
        if n < 2:
            return {}
        counted = self.matrix.diagonal()
        names = np.array(self.names, dtype=object)
        solved = np.lexsort((names, -counted))[:EASE_ITEMS]
        solved = solved[np.argsort(names[solved], kind="stable")]  # by id: a stable sort below ties by id
        # float32 and in place, the nearest picked a block of rows at a time: the worker's memory peak
        # (bench memory) has little room, and a float64 solve with a whole argsort took ~130 MiB more.
        gram = self.matrix[solved][:, solved].astype(np.float32).toarray()
        gram[np.diag_indices_from(gram)] += EASE_L2
        b = np.linalg.inv(gram)
        del gram
        b /= -np.diag(b).copy()[None, :]
        np.fill_diagonal(b, 0.0)
        keep = min(keep, len(solved) - 1)
        j, i, values = [], [], []
        for first in range(0, len(solved), SOLVE_BLOCK):
            block = b[first : first + SOLVE_BLOCK]
            nearest = np.argsort(-block, axis=1, kind="stable")[:, :keep]
            values.append(np.take_along_axis(block, nearest, axis=1).ravel().astype(np.float64) * EASE_SCALE)
            j.append(np.repeat(np.arange(first, first + len(block)), keep)), i.append(nearest.ravel())
        j, i, values = np.concatenate(j), np.concatenate(i), np.concatenate(values)
        some = values > 0
        return rows_of(list(names[solved]), j[some], i[some], values[some], None)
