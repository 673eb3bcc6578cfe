"""Durable state in SQLite (`state_dir/switchyard.db`, WAL): what must survive a restart.

Per model: weights, stable, last known-good version and traffic policy. Per rollout: its
whole document. A transition writes the model and its rollout in one transaction before the
change is pushed to Envoy, so a crash between the two replays the change on restart instead
of losing it. Writes take well under a millisecond, so they run on the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from controlplane import logs
from controlplane.config import Backend, ModelConfig, VersionConfig
from controlplane.errors import Invalid, Unavailable
from controlplane.state import Model, State, TrafficPolicy, Version

log = logs.get("store")
SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    doc TEXT NOT NULL,          -- {"weights", "stable", "last_good", "policy"}
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    active INTEGER NOT NULL,
    doc TEXT NOT NULL,          -- the rollout object of the admin API, plus engine fields
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rollouts_by_model ON rollouts (model, created_at);
CREATE INDEX IF NOT EXISTS rollouts_by_time ON rollouts (created_at, id);
"""
PAGE_MAX = 1000  # the most rollouts one page may hold


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The leader fence (Kubernetes: the Lease's `is_leader`): no write once it says no, so
        # a replica that lost the Lease never writes beside the new leader (ADR 0002).
        self.may_write: Callable[[], bool] = lambda: True
        try:
            self._db = sqlite3.connect(path, isolation_level=None)  # we manage transactions
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open state database {path}: {exc}") from None

    def save(self, models: Iterable[Model] = (), rollouts: Iterable[dict[str, Any]] = ()) -> None:
        """Write models and rollouts in one transaction: all of it lands, or none."""
        if not self.may_write():
            raise Unavailable("this replica does not hold the leader Lease: it writes nothing")
        now = time.time()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for model in models:
                doc = {
                    "weights": model.weights,
                    "stable": model.stable,
                    "last_good": model.last_good,
                    "policy": model.policy.to_json(),
                    # Run-time changes over switchyard.yaml: a model added through the API
                    # (its spec), versions added (with backends) and configured ones removed.
                    "spec": _dump(model.spec) if model.spec else None,
                    "added": {
                        v.name: _dump(v.backend)
                        for v in model.versions.values()
                        if v.added
                    },
                    "replicas": {
                        v.name: v.replicas
                        for v in model.versions.values()
                        if v.added and v.replicas != 1 and not v.backend.urls
                    },
                    "removed": sorted(model.removed),
                }
                self._db.execute(
                    "INSERT INTO models (name, doc, updated_at) VALUES (?, ?, ?) ON CONFLICT(name) "
                    "DO UPDATE SET doc=excluded.doc, updated_at=excluded.updated_at",
                    (model.name, json.dumps(doc), now),
                )
            for rollout in rollouts:
                self._db.execute(
                    "INSERT INTO rollouts (id, model, active, doc, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "active=excluded.active, doc=excluded.doc, updated_at=excluded.updated_at",
                    (
                        rollout["id"],
                        rollout["model"],
                        int(rollout["phase"] in ("progressing", "paused")),
                        json.dumps(rollout),
                        rollout["created_at"],
                        now,
                    ),
                )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise Unavailable(f"cannot persist the change: {exc}") from None

    def saved_model(self, name: str) -> str | None:
        """A model's saved row as it is (None if none): to put back with put_saved_model."""
        row = self._db.execute("SELECT doc FROM models WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def put_saved_model(self, name: str, doc: str | None) -> None:
        """Put back a row from saved_model (None: the model had none)."""
        if not self.may_write():
            raise Unavailable("this replica does not hold the leader Lease: it writes nothing")
        try:
            if doc is None:
                self._db.execute("DELETE FROM models WHERE name = ?", (name,))
            else:
                self._db.execute(
                    "INSERT INTO models (name, doc, updated_at) VALUES (?, ?, ?) ON CONFLICT(name) "
                    "DO UPDATE SET doc=excluded.doc, updated_at=excluded.updated_at",
                    (name, doc, time.time()),
                )
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot persist the change: {exc}") from None

    def restore_models(self, state: State) -> None:
        """Apply saved traffic onto the configured models where it still fits, and bring
        back the models added at run time."""
        for name, doc_json in self._db.execute("SELECT name, doc FROM models").fetchall():
            _restore(state, name, json.loads(doc_json))

    def restore_model(self, model: Model) -> None:
        """Apply the saved traffic of one model, if it has any (a model added again)."""
        row = self._db.execute("SELECT doc FROM models WHERE name = ?", (model.name,)).fetchone()
        if row is not None:
            _restore(State({model.name: model}), model.name, json.loads(row[0]))

    def rollouts(
        self,
        model: str | None = None,
        active: bool | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of rollout documents, newest first, and the cursor of the next page (None
        on the last). `before` is a cursor: the id of the last rollout of the previous page;
        Invalid (field `before`) when no rollout has that id."""
        query = "SELECT doc FROM rollouts WHERE 1=1"
        params: list[Any] = []
        if model is not None:
            query += " AND model = ?"
            params.append(model)
        if active is not None:
            query += " AND active = ?"
            params.append(int(active))
        if before is not None:
            row = self._db.execute(
                "SELECT created_at FROM rollouts WHERE id = ?", (before,)
            ).fetchone()
            if row is None:
                raise Invalid(f"unknown cursor {before!r}: give a `next` from a previous page",
                              field="before")  # fmt: skip
            query += " AND (created_at, id) < (?, ?)"
            params += [row[0], before]
        query += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)  # one more tells whether there is a next page
        docs = [json.loads(doc) for (doc,) in self._db.execute(query, params).fetchall()]
        if len(docs) > limit:
            return docs[:limit], docs[limit - 1]["id"]
        return docs, None

    def active_rollouts(self) -> list[dict[str, Any]]:
        """Every active rollout (at most one per model), oldest first: what a restart resumes."""
        rows = self._db.execute(
            "SELECT doc FROM rollouts WHERE active = 1 ORDER BY created_at, id"
        ).fetchall()
        return [json.loads(doc) for (doc,) in rows]

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        """One rollout document by id, however old."""
        row = self._db.execute("SELECT doc FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        self._db.close()


def _restore(state: State, name: str, doc: dict[str, Any]) -> None:
    """One saved model onto `state`. A saved split that names versions the model no longer
    has is ignored (the config's weights win) and logged, rather than routing to a version
    that does not exist."""
    model = state.models.get(name)
    if model is None and doc.get("spec"):
        spec = ModelConfig.model_validate(doc["spec"])
        model = state.models[name] = Model.from_config(spec)
        model.spec = spec
    if model is None:
        return
    _replay_versions(model, doc)
    weights = doc["weights"]
    if set(weights) != set(model.versions) or sum(weights.values()) != 100:
        logs.event(log, "store.weights_ignored", model=name, saved=json.dumps(weights))
        return
    for version, weight in weights.items():
        model.versions[version].weight = weight
    if doc.get("stable") in model.versions:
        model.stable = doc["stable"]
    if doc.get("last_good") in model.versions:
        model.last_good = doc["last_good"]
    policy = TrafficPolicy.from_json(doc.get("policy"))
    if policy.mirror_to is None or policy.mirror_to in model.versions:
        model.policy = policy
    logs.event(log, "store.model_restored", model=name, weights=json.dumps(weights))


def _replay_versions(model: Model, doc: dict[str, Any]) -> None:
    """Re-apply the versions added and removed at run time onto the configured ones."""
    for name in doc.get("removed", []):
        if name in model.versions and len(model.versions) > 1:
            del model.versions[name]
            model.removed.add(name)
    replicas = doc.get("replicas", {})
    for name, backend in doc.get("added", {}).items():
        if name not in model.versions:
            count = {"replicas": replicas[name]} if name in replicas else {}
            config = VersionConfig(name=name, weight=0, backend=Backend.model_validate(backend),
                                   **count)  # fmt: skip
            model.versions[name] = Version.from_config(config, added=True)
    if model.stable not in model.versions:
        model.stable = max(model.versions.values(), key=lambda v: v.weight).name


def _dump(config) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude_none=True)
