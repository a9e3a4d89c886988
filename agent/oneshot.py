"""``edge-agent run --once`` (alias ``--test``): one sample and its scores, nothing stored or sent.

Why: Telegraf's ``--test`` and Netdata's debug runs let an operator see what the agent would
read and conclude on this machine before it runs as a service. The detector is warmed on the
samples already buffered (read, never written), so the scores mean what they would mean in the
daemon; without a buffer the z-score says it is still warming up.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from agent.config import AgentConfig
from agent.sampling import Sampler, Source

log = logging.getLogger(__name__)

WARM_SAMPLES_MAX = 1000  # enough for the z-score baseline, quick on a Pi (~0.4 s)


def _history(db_path: Path, limit: int) -> list[tuple[float, dict[str, float]]]:
    from agent.status import open_readonly
    from agent.store import quote_ident

    conn = open_readonly(db_path)
    if conn is None:
        return []
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(samples)") if r[1] not in ("seq", "ts_s")]
        if not cols:
            return []
        rows = conn.execute(f"SELECT ts_s, {', '.join(map(quote_ident, cols))} FROM samples "
                            f"ORDER BY seq DESC LIMIT {int(limit)}").fetchall()
    finally:
        conn.close()
    return [(r[0], {c: v for c, v in zip(cols, r[1:]) if v is not None}) for r in reversed(rows)]


def sample_and_score(cfg: AgentConfig, source: Source, clock: Any, sleep: Callable[[float], None]) -> dict[str, Any]:
    """Two reads ``interval_s`` apart (rates need two), the detector warmed on the buffer, one score."""
    from agent.detection import detect_params
    from agent.webdata import _explain_text
    from agent.updates import current_model_dir
    from models.detect import Detector
    from models.forest import load_forest_model

    sampler = Sampler(source, cfg.sampling.mounts, clock)
    sampler.sample()
    sleep(cfg.agent.interval_s)
    sample = sampler.sample()
    forest, forest_error = None, None
    model_dir = current_model_dir(cfg.agent.state_dir, "forest")
    if model_dir is not None and cfg.detect.use_forest:
        try:
            forest = load_forest_model(model_dir)
        except (OSError, ValueError, KeyError) as exc:
            forest_error = str(exc)
    params = detect_params(cfg.detect)
    detector = Detector(params, forest=forest)
    history = _history(cfg.db_path, min(WARM_SAMPLES_MAX, params.zscore.window))
    log.debug("warming the detector on %d buffered samples from %s", len(history), cfg.db_path)
    for ts_s, values in history:
        detector.update(ts_s, values)
    row, _ = detector.update(sample.ts_s, sample.values)
    return {"device_id": cfg.device_id, "config": cfg.source, "ts_s": sample.ts_s, "values": dict(sample.values),
            "warmed_on": len(history), "zscore_ready": detector.zscore.ready, "detector": detector.detector_name,
            "model_version": detector.model_version, "forest_error": forest_error,
            "score": row.score, "anomaly_score": row.anomaly_score, "severity": row.severity,
            "z_max": row.z_max, "forest_score": row.forest_score,
            "explanation": [_explain_text(e) for e in row.explanation]}
