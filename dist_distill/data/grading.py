"""Difficulty grading (seed 2): each sample's teacher confidence, its bucket, and the grades file.

confidence(sample) = mean over its target tokens t (the answer and the EOS, data/rows.py) of
p_teacher(t | prefix), the full-vocabulary probability of the token the data says comes next
(TeacherScorer.score_with_targets / target_logprobs). Buckets by two edges lo < hi (grading.edges,
default 0.7, 0.9): hard (< lo), medium (lo <= c <= hi), easy (> hi); ids HARD=0, MEDIUM=1, EASY=2.

The grades file (``grades.npz``; a cache build writes ``<cache_dir>/grades.npz``, `dd-cache grade`
writes grading.grades) holds, indexed by the token store's sample index (the index the sampler draws,
whatever packing or shuffling does with it later):

    confidence  float64 [S]
    bucket      int8    [S]   under `edges` (meta); a recipe with other edges re-buckets from confidence
    records     int64   [S]   the source record of each sample (the store's records.npy)
    meta        str (JSON)    edges, num_samples, the store's token_ids_sha256 / targets_sha256, the teacher

and is bound to one store: `Grades.check_matches` refuses a file made for other data. 1M samples: 17 MB.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from dist_distill.errors import UserError
from dist_distill.objective.schedules import BUCKET_NAMES as BUCKETS  # bucket names by id (0, 1, 2)
DEFAULT_EDGES = (0.7, 0.9)


def sample_confidence(target_logprob: np.ndarray, rows_per_sample: np.ndarray) -> np.ndarray:
    """float64 [n]: mean of exp(target_logprob) over each sample's rows (rows sample-major, `rows_per_sample`
    int [n] of them per sample, as the scorer returns them). A sample without rows gets NaN."""
    lp = np.asarray(target_logprob, dtype=np.float64)
    counts = np.asarray(rows_per_sample, dtype=np.int64)
    if counts.sum() != len(lp):
        raise ValueError(f"{len(lp)} rows, but the samples have {int(counts.sum())} target tokens")
    sums = np.bincount(np.repeat(np.arange(len(counts)), counts), weights=np.exp(lp), minlength=len(counts))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def buckets_of(confidence: np.ndarray, edges=DEFAULT_EDGES) -> np.ndarray:
    """int8 [n] bucket ids: 0 hard (c < lo), 1 medium (lo <= c <= hi), 2 easy (c > hi)."""
    lo, hi = edges
    c = np.asarray(confidence, dtype=np.float64)
    return np.where(c > hi, 2, np.where(c < lo, 0, 1)).astype(np.int8)


def check_edges(edges, key: str = "grading.edges") -> tuple[float, float]:
    if len(edges) != 2 or not 0.0 <= edges[0] < edges[1] <= 1.0:
        raise UserError(f"{key}={list(edges)}: expected two probabilities lo < hi in [0, 1] (hard < lo <= medium "
                        f"<= hi < easy; seed 2: [0.7, 0.9])")
    return float(edges[0]), float(edges[1])


def write_grades(path: Path, confidence: np.ndarray, records: np.ndarray | None, edges, meta: dict) -> dict:
    """Write the grades file atomically; returns the bucket counts {name: n}."""
    from dist_distill.training.checkpoint import write_atomic

    confidence = np.asarray(confidence, dtype=np.float64)
    if not np.isfinite(confidence).all():
        raise UserError(f"grades for {path}: {int((~np.isfinite(confidence)).sum())} samples have no finite confidence")
    bucket = buckets_of(confidence, edges)
    counts = {name: int((bucket == i).sum()) for i, name in enumerate(BUCKETS)}
    meta = dict(meta, edges=list(edges), num_samples=len(confidence), counts=counts,
                mean_confidence=float(confidence.mean()) if len(confidence) else None)
    arrays = {"confidence": confidence, "bucket": bucket,
              "records": np.asarray(records if records is not None else np.arange(len(confidence)), np.int64),
              "meta": np.array(json.dumps(meta, sort_keys=True))}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _npz_bytes(arrays))
    return counts


def _npz_bytes(arrays: dict) -> bytes:
    """np.savez's format with a fixed timestamp on every member (np.savez stamps the current time), so the
    same grades give the same bytes (a resumed or re-sharded cache build is compared file by file)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def store_meta(data) -> dict:
    """The fields that bind grades to one token store (TokenizedData of data/records.py)."""
    return {"token_ids_sha256": data.fingerprint, "targets_sha256": data.targets_fingerprint, "source": data.source}


def store_records(data) -> np.ndarray | None:
    path = getattr(data.store, "path", None)
    return np.load(Path(path) / "records.npy") if path is not None and (Path(path) / "records.npy").is_file() else None


class Grades:
    """A grades file read back: confidence float64 [S], bucket int8 [S] (under the edges asked for), meta."""

    def __init__(self, path: str | Path, edges=DEFAULT_EDGES):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"grades file {self.path} does not exist: build the teacher cache (dd-cache build writes "
                            "<cache_dir>/grades.npz) or run `dd-cache grade RECIPE`")
        with np.load(self.path, allow_pickle=False) as z:
            self.confidence, stored, self.records = z["confidence"], z["bucket"], z["records"]
            self.meta = json.loads(str(z["meta"]))
        self.edges = tuple(float(e) for e in edges)
        self.bucket = stored if tuple(self.meta["edges"]) == self.edges else buckets_of(self.confidence, self.edges)

    def check_matches(self, data) -> "Grades":
        """Refuse grades made for other data than `data` (TokenizedData); returns self."""
        want = store_meta(data)
        if len(self.confidence) != len(data) or self.meta.get("token_ids_sha256") != want["token_ids_sha256"] \
                or self.meta.get("targets_sha256") != want["targets_sha256"]:
            raise UserError(f"grades file {self.path} was made for other data ({self.meta.get('source')}, "
                            f"{len(self.confidence)} samples) than data.train {data.source} ({len(data)} samples, "
                            "token ids or target positions differ): re-grade it (dd-cache grade RECIPE)")
        return self

    def pools(self) -> dict[str, np.ndarray]:
        """Sample ids of each bucket, ascending: {name: int64 [n_b]}."""
        return {name: np.flatnonzero(self.bucket == i).astype(np.int64) for i, name in enumerate(BUCKETS)}


def grades_path(recipe) -> Path:
    """grading.grades, else <teacher_source.cache_dir>/grades.npz; a UserError when neither is set."""
    if recipe.grading.grades:
        return Path(recipe.grading.grades)
    if recipe.teacher_source.cache_dir:
        return Path(recipe.teacher_source.cache_dir) / "grades.npz"
    raise UserError("training by difficulty bucket needs grades: set grading.grades (written by `dd-cache grade "
                    "RECIPE`) or teacher_source.cache_dir (a cache build writes <cache_dir>/grades.npz)")
