"""Durable state in SQLite (`state_dir/switchyard.db`): what must survive a restart.

Today: each model's weights and stable version. Writes happen before the change is pushed
to Envoy, so a crash between the two replays the change on restart instead of losing it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from controlplane import logs
from controlplane.errors import Unavailable
from controlplane.state import State

log = logs.get("store")
SCHEMA = """
CREATE TABLE IF NOT EXISTS model_weights (
    model TEXT PRIMARY KEY,
    weights TEXT NOT NULL,      -- JSON object version -> percent
    stable TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; we are one writer
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open state database {path}: {exc}") from None

    def save_weights(self, model: str, weights: dict[str, int], stable: str) -> None:
        try:
            self._db.execute(
                "INSERT INTO model_weights (model, weights, stable, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(model) DO UPDATE SET "
                "weights=excluded.weights, stable=excluded.stable, updated_at=excluded.updated_at",
                (model, json.dumps(weights), stable, time.time()),
            )
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot persist weights of {model!r}: {exc}") from None

    def restore_weights(self, state: State) -> None:
        """Apply saved weights onto the configured models where they still fit.

        A saved split that names versions the config no longer has is ignored (the config's
        weights win) and logged, rather than routing to a version that does not exist.
        """
        rows = self._db.execute("SELECT model, weights, stable FROM model_weights").fetchall()
        for name, weights_json, stable in rows:
            model = state.models.get(name)
            if model is None:
                continue
            weights = json.loads(weights_json)
            if set(weights) != set(model.versions) or sum(weights.values()) != 100:
                logs.event(log, "store.weights_ignored", model=name, saved=weights_json)
                continue
            for version, weight in weights.items():
                model.versions[version].weight = weight
            if stable in model.versions:
                model.stable = stable
            logs.event(log, "store.weights_restored", model=name, weights=weights_json)

    def close(self) -> None:
        self._db.close()
