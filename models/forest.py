"""Compact tree-ensemble engine (numpy only): Isolation Forest scoring on the device.

The trees are plain arrays concatenated into one flat node table (global node
ids), so every tree is walked at once, one depth level per step: for one row
that is ``max_depth`` vectorised steps over ``n_trees`` nodes instead of one
Python/joblib call per tree. Leaves point to themselves, so walking past a leaf
is a no-op and no masking is needed.

The engine is generic: each leaf carries a value vector (``value``, shape
(n_nodes, n_outputs)) and ``leaf_sum`` / ``leaf_mean`` aggregate them over
trees, which is what a random-forest classifier needs too. For an Isolation
Forest the single leaf value is sklearn's per-tree path length
``depth(leaf) + c(n_node_samples(leaf)) - 1`` and

    score_samples = -2 ** (-sum_trees(leaf value) / (n_trees * c(max_samples_)))
    decision_function = score_samples - offset_

exactly as sklearn.ensemble.IsolationForest computes them (X is cast to float32
first, like sklearn does; NaN follows ``missing_go_left``).

Files: ``save(path)`` writes a .npz of plain arrays (loaded with
allow_pickle=False: a model from the network cannot run code). Model
directories (forest.npz + model.json) are read by ``load_forest_model``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EULER_GAMMA = 0.5772156649015329  # == np.euler_gamma


def average_path_length(n: np.ndarray | float) -> np.ndarray:
    """c(n): average path length of an unsuccessful BST search (sklearn's formula)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros(n.shape)
    two = n == 2
    big = n > 2
    out[two] = 1.0
    nb = n[big]
    out[big] = 2.0 * (np.log(nb - 1.0) + np.euler_gamma) - 2.0 * (nb - 1.0) / nb
    return out


@dataclass
class CompactForest:
    """Flat node table of a tree ensemble; arrays are the model, nothing else."""

    children_left: np.ndarray     # (n_nodes,) int32, local index within tree, -1 for leaf
    children_right: np.ndarray    # (n_nodes,) int32
    feature: np.ndarray           # (n_nodes,) int32, column of X (leaves: 0)
    threshold: np.ndarray         # (n_nodes,) float64
    missing_go_left: np.ndarray   # (n_nodes,) uint8
    n_node_samples: np.ndarray    # (n_nodes,) int64 (generic; IF uses it via value)
    value: np.ndarray             # (n_nodes, n_outputs) float64
    tree_offsets: np.ndarray      # (n_trees + 1,) int64 start of each tree in the table
    n_features: int
    kind: str = "isolation"       # "isolation" or "sum"/"mean" generic ensembles
    offset: float = -0.5          # IsolationForest.offset_
    max_samples: int = 256        # IsolationForest.max_samples_
    _left: np.ndarray = field(init=False, repr=False)
    _right: np.ndarray = field(init=False, repr=False)
    _roots: np.ndarray = field(init=False, repr=False)
    _depth: int = field(init=False, repr=False)
    _mgl: np.ndarray = field(init=False, repr=False)
    _child: np.ndarray = field(init=False, repr=False)
    _feat: np.ndarray = field(init=False, repr=False)
    _denom: float = field(init=False, repr=False)
    _leaf_depth: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.children_left = np.ascontiguousarray(self.children_left, dtype=np.int32)
        self.children_right = np.ascontiguousarray(self.children_right, dtype=np.int32)
        self.feature = np.ascontiguousarray(self.feature, dtype=np.int32)
        self.threshold = np.ascontiguousarray(self.threshold, dtype=np.float64)
        self.missing_go_left = np.ascontiguousarray(self.missing_go_left, dtype=np.uint8)
        self.n_node_samples = np.ascontiguousarray(self.n_node_samples, dtype=np.int64)
        self.value = np.ascontiguousarray(self.value, dtype=np.float64)
        if self.value.ndim == 1:
            self.value = self.value[:, None]
        self.tree_offsets = np.ascontiguousarray(self.tree_offsets, dtype=np.int64)
        n = len(self.threshold)
        for a in (self.children_left, self.children_right, self.feature, self.missing_go_left,
                  self.n_node_samples):
            if a.shape != (n,):
                raise ValueError("node arrays must all have shape (n_nodes,)")
        if self.value.shape[0] != n or self.tree_offsets[-1] != n or self.tree_offsets[0] != 0:
            raise ValueError("value / tree_offsets inconsistent with node count")
        self._build()

    # -- flattening ------------------------------------------------------
    def _build(self) -> None:
        n = len(self.threshold)
        tree_of = np.repeat(np.arange(self.n_trees), np.diff(self.tree_offsets))
        base = self.tree_offsets[tree_of]
        leaf = self.children_left < 0
        own = np.arange(n, dtype=np.int64)
        left = np.where(leaf, own, base + self.children_left)
        right = np.where(leaf, own, base + self.children_right)
        if ((left < 0) | (left >= n) | (right < 0) | (right >= n)).any():
            raise ValueError("child index out of range")
        feat = self.feature.copy()
        feat[leaf] = 0
        if (feat < 0).any() or (feat >= self.n_features).any():
            raise ValueError("feature index out of range")
        self.feature = feat
        self._left = left.astype(np.intp)
        self._right = right.astype(np.intp)
        # interleaved children: child[2*node + went_right]
        self._child = np.stack([self._left, self._right], axis=1).ravel()
        self._feat = feat.astype(np.intp)
        self._roots = self.tree_offsets[:-1].astype(np.intp)
        self._depth = self._max_depth()
        self._mgl = self.missing_go_left.astype(bool)
        self._denom = self.n_trees * float(average_path_length(self.max_samples))
        self._leaf_depth = np.ascontiguousarray(self.value[:, 0])

    def _max_depth(self) -> int:
        depth = 0
        nodes = self._roots.copy()
        while True:
            internal = self.children_left[nodes] >= 0
            if not internal.any():
                return depth
            depth += 1
            nodes = np.concatenate([self._left[nodes[internal]], self._right[nodes[internal]]])

    @property
    def n_trees(self) -> int:
        return len(self.tree_offsets) - 1

    @property
    def n_nodes(self) -> int:
        return len(self.threshold)

    @property
    def max_depth(self) -> int:
        return self._depth

    # -- walking -----------------------------------------------------------
    def apply(self, X: np.ndarray) -> np.ndarray:
        """Global leaf id per (row, tree); X is cast to float32 like sklearn does."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None, :]
        if X.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {X.shape[1]}")
        has_nan = bool(np.isnan(X).any())
        child, feat, thr = self._child, self._feat, self.threshold
        if X.shape[0] == 1 and not has_nan:
            # hot path: ~6 small numpy ops per depth level over n_trees nodes
            x = X[0]
            node = self._roots
            for _ in range(self._depth):
                node = child.take((node << 1) | (x.take(feat.take(node)) > thr.take(node)))
            return node[None, :]
        n = X.shape[0]
        node = np.broadcast_to(self._roots, (n, self.n_trees)).copy()
        flat = X.ravel()
        row_base = (np.arange(n, dtype=np.intp) * self.n_features)[:, None]
        for _ in range(self._depth):
            xv = flat.take(row_base + feat.take(node))
            right = xv > thr.take(node)
            if has_nan:
                # sklearn: NaN goes left iff missing_go_to_left
                right |= np.isnan(xv) & ~self._mgl.take(node)
            node = child.take((node << 1) | right)
        return node

    def leaf_sum(self, X: np.ndarray) -> np.ndarray:
        """Sum over trees of the leaf value vectors, shape (n_rows, n_outputs)."""
        return self.value[self.apply(X)].sum(axis=1)

    def leaf_mean(self, X: np.ndarray) -> np.ndarray:
        return self.leaf_sum(X) / self.n_trees

    # -- Isolation Forest --------------------------------------------------
    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """sklearn IsolationForest.score_samples: lower = more abnormal, in [-1, 0)."""
        if self.kind != "isolation":
            raise ValueError("score_samples needs an isolation forest")
        depths = self._leaf_depth.take(self.apply(X)).sum(axis=1)
        if self._denom == 0:
            # sklearn: a single training sample gives depth 0 / denominator 0 -> 2**-1
            return -np.full(len(depths), 0.5)
        return -(2.0 ** (-(depths / self._denom)))

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return self.score_samples(X) - self.offset

    def score_one(self, x: np.ndarray) -> float:
        """Hot path: anomaly score ``-score_samples`` of one row (higher = more abnormal)."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self.kind != "isolation" or x.shape[0] != self.n_features or self._denom == 0 or np.isnan(x).any():
            return float(-self.score_samples(x[None, :])[0])
        child, feat, thr = self._child, self._feat, self.threshold
        node = self._roots
        for _ in range(self._depth):
            node = child.take((node << 1) | (x.take(feat.take(node)) > thr.take(node)))
        return float(2.0 ** (-(self._leaf_depth.take(node).sum() / self._denom)))

    # -- persistence -------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
            "children_left": self.children_left,
            "children_right": self.children_right,
            "feature": self.feature.astype(np.int32),
            "threshold": self.threshold,
            "missing_go_left": self.missing_go_left,
            "n_node_samples": self.n_node_samples,
            "value": self.value,
            "tree_offsets": self.tree_offsets,
            "n_features": np.array(self.n_features, dtype=np.int64),
            "kind": np.array(self.kind),
            "offset": np.array(self.offset, dtype=np.float64),
            "max_samples": np.array(self.max_samples, dtype=np.int64),
        }

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez_compressed(f, **self.to_arrays())

    @classmethod
    def load(cls, path: str | Path) -> "CompactForest":
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"unsupported forest format {version}")
            return cls(
                children_left=z["children_left"], children_right=z["children_right"],
                feature=z["feature"], threshold=z["threshold"], missing_go_left=z["missing_go_left"],
                n_node_samples=z["n_node_samples"], value=z["value"], tree_offsets=z["tree_offsets"],
                n_features=int(z["n_features"]), kind=str(z["kind"]), offset=float(z["offset"]),
                max_samples=int(z["max_samples"]),
            )

    @classmethod
    def from_trees(cls, trees: list[dict[str, np.ndarray]], n_features: int, **kw: Any) -> "CompactForest":
        """Concatenate per-tree arrays (keys as the dataclass fields, local child ids)."""
        sizes = [len(t["threshold"]) for t in trees]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        cat = {k: np.concatenate([np.asarray(t[k]) for t in trees])
               for k in ("children_left", "children_right", "feature", "threshold",
                         "missing_go_left", "n_node_samples", "value")}
        return cls(tree_offsets=offsets, n_features=n_features, **cat, **kw)


@dataclass(frozen=True)
class ForestModel:
    """A loaded model directory: engine + the metadata that makes it usable."""

    forest: CompactForest
    feature_names: tuple[str, ...]
    thresholds: dict[str, float]        # anomaly-score (-score_samples) cut-offs: warning, critical, median
    version: int
    meta: dict

    @property
    def baseline(self) -> dict | None:
        return self.meta.get("baseline")


def load_forest_model(model_dir: str | Path) -> ForestModel:
    """Read forest.npz + model.json written by models.training.forest."""
    d = Path(model_dir)
    meta = json.loads((d / "model.json").read_text(encoding="utf-8"))
    if meta.get("kind") != "forest":
        raise ValueError(f"{d}: model kind {meta.get('kind')!r} is not 'forest'")
    forest = CompactForest.load(d / meta.get("artefact", "forest.npz"))
    names = tuple(meta["feature_names"])
    if len(names) != forest.n_features:
        raise ValueError(f"{d}: {len(names)} feature names for a {forest.n_features}-feature forest")
    th = {k: float(v) for k, v in meta["thresholds"].items()}
    if not (math.isfinite(th["warning"]) and th["critical"] >= th["warning"]):
        raise ValueError(f"{d}: bad thresholds {th}")
    return ForestModel(forest=forest, feature_names=names, thresholds=th, version=int(meta["version"]), meta=meta)


def forest_stand_ins(model: ForestModel) -> tuple[tuple[int, str, float], ...]:
    """(column, base metric, training median) for every column a missing metric can be replaced in.

    Why: a fleet model trained where a metric exists (system.temperature) must still score on a
    device without that sensor; the training median is the value that moves the trees least.
    Empty when model.json has no baseline medians (such a forest skips rows with a gap).
    """
    medians = (model.meta.get("baseline") or {}).get("median")
    if not isinstance(medians, list) or len(medians) != len(model.feature_names):
        return ()
    return tuple((i, name.split("|", 1)[0], float(m)) for i, (name, m) in enumerate(zip(model.feature_names, medians))
                 if isinstance(m, (int, float)) and math.isfinite(m))
