"""User segments: k-means on the user vectors (``faiss.Kmeans``, on the GPU when FAISS has one).

K is given (``k``) or chosen by the silhouette score (scikit-learn) over ``k_min .. k_max``,
computed on a random sample of users: each candidate K is clustered on the sample and the K with
the highest mean silhouette wins; the final clustering then runs on every user with that K.

Each segment is described by its size, the categories over-represented in it (from the interest
profiles: the segment's mean share of interest in a category against all users' mean share, ranked by
share x log(lift), so a category must be both more frequent than in the population and not negligible),
its mean propensity (when there is a propensity model), the attribute values over-represented in it
(ranked the same way, from the user attribute table the network was trained with), representative
users (closest to the centre), and a label (:func:`label_segments`): its most over-represented
categories and attribute value, unique across the segments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from dmp_dl.core.errors import ConfigError, DataError
from dmp_dl.evaluation.report import segment_label as segment_label  # the label reports and jobs print

log = logging.getLogger(__name__)


@dataclass
class SegmentOptions:
    """``audience.segments`` in the config.

    k: the number of segments; null chooses it by silhouette over ``k_min .. k_max``.
    sample: users drawn (seeded) for the silhouette sweep; silhouette costs O(sample²).
    niter, nredo: k-means iterations, and restarts (k-means++ seeds) of which the best objective is kept.
    normalize: cluster L2-normalised vectors (cosine geometry; the two-tower model's vectors are
        already unit length, matrix factorisation's are not).
    gpu: use FAISS GPUs when FAISS has any (``auto``), never (false) or always (true).
    representatives: users listed per segment (nearest to its centre).
    top_categories, top_attributes: entries listed per segment description.
    label_categories: at most this many categories in a segment's label.
    label_min_lift: a category or attribute value enters a label (and leads the lists) only when its
        lift, the segment's share over the population's, is above this (where any is).
    """

    k: int | None = None
    k_min: int = 2
    k_max: int = 12
    sample: int = 5000
    niter: int = 50
    nredo: int = 5
    normalize: bool = True
    seed: int = 0
    gpu: bool | str = "auto"
    representatives: int = 5
    top_categories: int = 3
    top_attributes: int = 3
    label_categories: int = 2
    label_min_lift: float = 1.2

    def __post_init__(self) -> None:
        if self.k is not None and int(self.k) < 1:
            raise ConfigError(f"audience.segments.k must be >= 1 or null (choose by silhouette), got {self.k}")
        if not 2 <= int(self.k_min) <= int(self.k_max):
            raise ConfigError(f"audience.segments needs 2 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        for name in ("sample", "niter", "nredo"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"audience.segments.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.label_categories) < 1:
            raise ConfigError(f"audience.segments.label_categories must be >= 1, got {self.label_categories}")
        if not np.isfinite(float(self.label_min_lift)) or float(self.label_min_lift) < 1:
            raise ConfigError(f"audience.segments.label_min_lift must be >= 1, got {self.label_min_lift}")
        if self.gpu not in ("auto", True, False):
            raise ConfigError(f"audience.segments.gpu must be auto, true or false, got {self.gpu!r}")


@dataclass
class Segmentation:
    """The result of :func:`segment_users`.

    assignments: (n_users,) int32 segment of each user; centroids: (K, d) float32 centres in the
    clustered space (normalised vectors when ``normalize``); distances: (n_users,) float32 squared
    L2 distance of each user to its centre; silhouette: K -> mean silhouette on the sample (empty when
    K was given); sample_size: users in that sample.
    """

    assignments: np.ndarray
    centroids: np.ndarray
    distances: np.ndarray
    silhouette: dict[int, float]
    sample_size: int
    normalize: bool

    @property
    def k(self) -> int:
        return int(len(self.centroids))

    def sizes(self) -> np.ndarray:
        return np.bincount(self.assignments, minlength=self.k)


def _use_gpu(option: bool | str) -> bool:
    import faiss

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if option is True and n == 0:
        raise ConfigError("audience.segments.gpu=true but this FAISS build sees no GPU (install faiss-gpu or use auto)")
    return bool(option) and n > 0


def prepare_vectors(vectors: np.ndarray, normalize: bool) -> np.ndarray:
    """(n, d) float32 C-contiguous copy, L2-normalised when ``normalize`` (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
    return x


def kmeans(x: np.ndarray, k: int, options: SegmentOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``faiss.Kmeans`` on ``x`` (n, d) float32, ``nredo`` restarts from k-means++ seeds
    (scikit-learn's ``kmeans_plusplus``), the lowest objective kept. Returns centroids (k, d),
    labels (n,) int64 and squared distances (n,) float32.

    FAISS seeds with k random points, which often puts two centres in one true cluster and none in
    another: a K with a worse silhouette than it deserves, so K would be chosen wrongly.
    """
    import faiss
    from sklearn.cluster import kmeans_plusplus

    best = None
    for redo in range(int(options.nredo)):
        seed = int(options.seed) + redo
        init, _ = kmeans_plusplus(x, int(k), random_state=seed)
        km = faiss.Kmeans(x.shape[1], int(k), niter=int(options.niter), nredo=1, seed=seed, gpu=_use_gpu(options.gpu),
                          verbose=False, min_points_per_centroid=1, max_points_per_centroid=max(256, len(x) // int(k) + 1))
        km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        if best is None or km.obj[-1] < best.obj[-1]:
            best = km
    dist, labels = best.index.search(x, 1)
    return best.centroids.copy(), labels[:, 0].astype(np.int64), dist[:, 0]


def choose_k(x: np.ndarray, options: SegmentOptions, progress: bool = False) -> tuple[int, dict[int, float], int]:
    """The K in ``k_min .. k_max`` with the highest silhouette on a seeded sample of ``x``.

    Returns (K, {K: silhouette}, sample size). Ties go to the smaller K.
    """
    from sklearn.metrics import silhouette_score
    from tqdm.auto import tqdm

    n = len(x)
    rng = np.random.default_rng(options.seed)
    sample = x[np.sort(rng.choice(n, size=min(n, int(options.sample)), replace=False))]
    k_max = min(int(options.k_max), len(sample) - 1)
    if k_max < int(options.k_min):
        raise DataError(f"audience.segments: {n} users are too few to compare k = {options.k_min}..{options.k_max} "
                          f"by silhouette; set audience.segments.k")
    scores: dict[int, float] = {}
    for k in tqdm(range(int(options.k_min), k_max + 1), desc="choosing K (silhouette)", disable=not progress, leave=False):
        _, labels, _ = kmeans(sample, k, options)
        if len(np.unique(labels)) < 2:
            continue
        scores[k] = float(silhouette_score(sample, labels, metric="euclidean"))
        log.debug("k=%d silhouette=%.4f", k, scores[k])
    if not scores:
        raise DataError("audience.segments: every candidate K collapsed into one cluster (are the user vectors all equal?); set audience.segments.k")
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores, len(sample)


def segment_users(vectors: np.ndarray, options: SegmentOptions | None = None, progress: bool = False) -> Segmentation:
    """Segment users by k-means on ``vectors`` (n_users, d); K as configured or by silhouette."""
    opts = options or SegmentOptions()
    x = prepare_vectors(vectors, opts.normalize)
    if len(x) < 2:
        raise DataError(f"segments: {len(x)} user(s) cannot be segmented")
    if opts.k is None:
        k, scores, sample_size = choose_k(x, opts, progress)
        log.info("segments: K=%d chosen by silhouette (%s)", k, ", ".join(f"{c}: {s:.3f}" for c, s in scores.items()))
    else:
        k, scores, sample_size = int(opts.k), {}, 0
        if k > len(x):
            raise ConfigError(f"audience.segments.k={k} exceeds the {len(x)} users")
    centroids, labels, dist = kmeans(x, k, opts)
    return Segmentation(labels.astype(np.int32), centroids.astype(np.float32), dist.astype(np.float32), scores,
                        sample_size, bool(opts.normalize))


def assign(vectors: np.ndarray, centroids: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of each vector: (n,) int64 segments and (n,) float32 squared distances."""
    import faiss

    x = prepare_vectors(vectors, normalize)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, labels = index.search(x, 1)
    return labels[:, 0].astype(np.int64), dist[:, 0]


# -- descriptions ----------------------------------------------------------------------------


def _segment_means(assignments: np.ndarray, k: int, values: sp.spmatrix | np.ndarray) -> np.ndarray:
    """(k, m) mean of the rows of ``values`` (n, m) per segment."""
    n = len(assignments)
    member = sp.csr_matrix((np.ones(n), (assignments, np.arange(n))), shape=(k, n))
    sums = np.asarray((member @ values).todense() if sp.issparse(values) else member @ values)
    return sums / np.maximum(np.bincount(assignments, minlength=k), 1)[:, None]


def representatives(assignments: np.ndarray, distances: np.ndarray, k: int, n: int) -> list[np.ndarray]:
    """Per segment, the rows of its ``n`` users closest to the centre (closest first)."""
    order = np.lexsort((np.arange(len(assignments)), distances, assignments))
    seg = assignments[order]
    starts = np.searchsorted(seg, np.arange(k))
    rank = np.arange(len(order)) - starts[seg]
    keep = rank < n
    return np.split(order[keep], np.searchsorted(seg[keep], np.arange(1, k)))


def over_represented_order(seg_share: np.ndarray, all_share: np.ndarray, min_lift: float) -> tuple[np.ndarray, np.ndarray]:
    """Per segment, the columns ranked from most to least over-represented.

    seg_share: (k, m) mean share per segment; all_share: (m,) over all users. Columns whose lift
    (seg_share / all_share) is above ``min_lift`` come first, by share x log(lift), the column's term in
    the segment's divergence from the population (a large share barely above the population's and a
    tiny share far above it both rank low); then the rest by lift. Ties go to the lower column.
    Returns (k, m) int64 column order and (k, m) float64 lift (0 where the population share is 0).
    """
    lift = np.divide(seg_share, all_share, out=np.zeros_like(seg_share, dtype=np.float64), where=all_share > 0)
    eligible = lift > min_lift
    score = np.where(eligible, seg_share * np.log(np.where(eligible, lift, 1.0)), 0.0)
    cols = np.broadcast_to(np.arange(seg_share.shape[1]), seg_share.shape)
    order = np.lexsort((cols, -lift, -score, ~eligible), axis=-1) if seg_share.size else np.zeros(seg_share.shape, np.int64)
    return order, lift


def attribute_skew(assignments: np.ndarray, k: int, features, top: int, min_lift: float = 1.0) -> list[dict]:
    """Per segment: numeric attributes' segment mean vs overall mean (original units), and the
    ``top`` categorical values (``column=value``) most over-represented in it (share, overall, lift;
    ranked by :func:`over_represented_order`).

    features: the user :class:`~dmp_dl.data.features.FeatureTable` (rows aligned with the users; its
    extra last row, the unknown user, is ignored). A missing numeric value is encoded as the mean,
    so numeric means lean towards the overall mean where values are missing.
    """
    n = len(assignments)
    out: list[dict] = [{"numeric": {}, "over_represented": []} for _ in range(k)]
    if features is None:
        return out
    numeric = np.asarray(features.numeric[:n], dtype=np.float64)
    if numeric.shape[1]:
        seg_mean = _segment_means(assignments, k, numeric)
        all_mean = numeric.mean(axis=0)
        for j, col in enumerate(features.numeric_columns):
            std, mean = features.numeric_std[j], features.numeric_mean[j]
            for s in range(k):
                out[s]["numeric"][col] = {"mean": float(seg_mean[s, j] * std + mean), "overall": float(all_mean[j] * std + mean)}
    tokens = np.asarray(features.tokens[:n])
    if len(features.token_vocab):
        rows, slots = np.nonzero(tokens > 0)
        onehot = sp.csr_matrix((np.ones(len(rows)), (rows, tokens[rows, slots] - 1)), shape=(n, len(features.token_vocab)))
        onehot.data[:] = 1.0
        seg_share = _segment_means(assignments, k, onehot)
        all_share = np.asarray(onehot.mean(axis=0)).ravel()
        order, lift = over_represented_order(seg_share, all_share, min_lift)
        for s in range(k):
            for t in order[s][:top]:
                if seg_share[s, t] <= 0 or lift[s, t] <= 1:
                    continue
                out[s]["over_represented"].append({"value": features.token_vocab[t], "share": float(seg_share[s, t]),
                                                   "overall": float(all_share[t]), "lift": float(lift[s, t])})
    return out


def describe_segments(seg: Segmentation, user_ids: np.ndarray, profiles=None, propensity: np.ndarray | None = None,
                      user_features=None, options: SegmentOptions | None = None) -> list[dict]:
    """One JSON-safe description per segment (see the module docstring).

    user_ids: (n_users,) external ids; profiles: :class:`~dmp_dl.audience.profiles.Profiles` or
    None; propensity: (n_users,) probabilities or None; user_features: the user FeatureTable or None.
    """
    opts = options or SegmentOptions()
    k, n = seg.k, len(seg.assignments)
    sizes = seg.sizes()
    a = seg.assignments.astype(np.int64)
    reps = representatives(a, seg.distances, k, int(opts.representatives))
    skew = attribute_skew(a, k, user_features, int(opts.top_attributes), float(opts.label_min_lift))
    cat_share = cat_all = None
    if profiles is not None and len(profiles.categories):
        shares = profiles.share_matrix()
        cat_share = _segment_means(a, k, shares)
        cat_all = np.asarray(shares.mean(axis=0)).ravel()
        cat_order, cat_lift = over_represented_order(cat_share, cat_all, float(opts.label_min_lift))
    prop_mean = _segment_means(a, k, np.asarray(propensity, dtype=np.float64)[:, None])[:, 0] if propensity is not None else None
    out = []
    for s in range(k):
        d: dict = {"segment": s, "size": int(sizes[s]), "share": float(sizes[s] / n)}
        if cat_share is not None:
            top = [c for c in cat_order[s] if cat_share[s, c] > 0][: int(opts.top_categories)]
            d["top_categories"] = [{"category": profiles.categories[c], "share": float(cat_share[s, c]),
                                    "lift": float(cat_lift[s, c]) if cat_all[c] > 0 else None} for c in top]
        d["mean_propensity"] = float(prop_mean[s]) if prop_mean is not None else None
        d["attributes"] = skew[s]
        d["representatives"] = [str(u) for u in np.asarray(user_ids)[reps[s]]]
        out.append(d)
    if cat_share is None:
        candidates = [[] for _ in range(k)]
    else:
        candidates = [[profiles.categories[c] for c in cat_order[s] if cat_share[s, c] > 0 and cat_lift[s, c] > opts.label_min_lift]
                      or [profiles.categories[c] for c in cat_order[s][:1] if cat_share[s, c] > 0] for s in range(k)]
    attributes = [[a["value"] for a in skew[s]["over_represented"] if a["lift"] > opts.label_min_lift] for s in range(k)]
    for d, (label, cats) in zip(out, label_segments(candidates, attributes, sizes, int(opts.label_categories))):
        d["label"], d["label_categories"] = label, cats
    return out


def label_segments(categories: list[list[str]], attributes: list[list[str]], sizes: np.ndarray,
                   n_categories: int = 2) -> list[tuple[str, list[str]]]:
    """A label per segment, no two alike: up to ``n_categories`` of its over-represented categories and
    its most over-represented attribute value (``Horror, Thriller, gender=M``).

    categories, attributes: per segment, its over-represented categories / attribute values, most
    over-represented first; sizes: (k,) users per segment. Larger segments choose first: each takes the
    first combination of its candidates (as a set; the first ``n_categories``, then pairs further down
    its list, then single categories) that no segment has taken, followed by its first attribute value;
    when every combination is taken, ``segment <s>`` is appended. Returns (label, label categories)
    per segment, in segment order.
    """
    from itertools import combinations

    k = len(categories)
    taken: set = set()
    chosen: list[tuple[str, list[str]]] = [("", [])] * k
    for s in sorted(range(k), key=lambda s: (-int(sizes[s]), s)):
        cands = categories[s][:6]
        n = min(n_categories, len(cands))
        options = [list(c) for size in range(n, 0, -1) for c in combinations(cands, size)] or [[]]
        attr = attributes[s][:1]
        label_cats, label = options[0], None
        for combo in options:
            text = ", ".join(combo + attr)
            if frozenset(combo) not in taken and text and text not in taken:
                label_cats, label = combo, text
                break
        if label is None:  # every combination taken: the segment number keeps the label unique
            label = ", ".join(label_cats + attr + [f"segment {s}"])
        taken.update({frozenset(label_cats), label})
        chosen[s] = (label, label_cats)
    return chosen


