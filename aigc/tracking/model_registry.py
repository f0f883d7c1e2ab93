"""The MLflow model registry: versions, their tags and aliases (never the deprecated stages), and
the alias lock that makes a promotion a compare-and-set. What to promote is decided elsewhere
(``aigc/promotion.py``, plain logic)."""

from __future__ import annotations

import os
import random
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from aigc.config import TrackingConfig
from aigc.errors import UserError
from aigc.tracking.store import _check_reachable, resolve_uri

LOCK_SUFFIX = ".alias-lock"  # Registry.lock: the registered model "<name>.alias-lock" is the mutex
LOCK_TOKEN_TAG = "aigc.lock.token"
LOCK_TIMEOUT_S = 300.0
LOCK_STALE_S = 60.0


@dataclass(frozen=True)
class ModelVersion:
    """One registered version, as the rest of aigc sees it (no MLflow types outside aigc.tracking)."""

    name: str
    version: str
    tags: dict[str, str]
    aliases: list[str]
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _version(mv: Any) -> ModelVersion:
    return ModelVersion(mv.name, str(mv.version), dict(mv.tags or {}), list(mv.aliases or []), mv.run_id)


class Registry:
    """The MLflow model registry of one tracking store (the registry lives beside the runs)."""

    def __init__(self, uri: str):
        _check_reachable(uri)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    @classmethod
    def open(cls, cfg: TrackingConfig) -> "Registry":
        """The registry of ``MLFLOW_TRACKING_URI``, else ``tracking.uri`` (as the pipeline does)."""
        return cls(resolve_uri(cfg))

    def _model(self, name: str) -> Any | None:
        try:
            return self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def by_alias(self, name: str, alias: str) -> ModelVersion | None:
        """The version ``alias`` points at; None when the model or the alias does not exist yet."""
        model = self._model(name)
        if model is None or alias not in (model.aliases or {}):
            return None
        return _version(self.client.get_model_version(name, model.aliases[alias]))

    def find(self, name: str, tag: str, value: str) -> ModelVersion | None:
        """The newest version of ``name`` whose tag ``tag`` is ``value`` (e.g. the same generator file)."""
        if self._model(name) is None:
            return None
        found = [mv for mv in self.client.search_model_versions(f"name = '{name}'") if (mv.tags or {}).get(tag) == value]
        return _version(max(found, key=lambda mv: int(mv.version))) if found else None

    def register(self, model_uri: str, name: str, tags: dict[str, str]) -> ModelVersion:
        """A new version of ``name`` (created if needed) from a logged model's URI, with ``tags``."""
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        source, run_id, model_id = model_uri, None, None
        if model_uri.startswith("models:/m-"):
            # Resolve the logged model here, through this client: given a models:/ source (or no
            # run id), MLflow 3.17's SQL registry store looks the model up through a new
            # MlflowClient() -- the process-wide URI, i.e. possibly another store.
            logged = self.client.get_logged_model(model_uri.removeprefix("models:/"))
            source, run_id, model_id = logged.artifact_location, logged.source_run_id, logged.model_id
        mv = self.client.create_model_version(name, source=source, run_id=run_id,
                                              tags={k: str(v) for k, v in tags.items()}, model_id=model_id)
        return _version(self.client.get_model_version(name, mv.version))

    def set_tags(self, version: ModelVersion, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(version.name, version.version, key, str(value))

    def set_alias(self, version: ModelVersion, alias: str) -> None:
        """Point ``alias`` at ``version`` (moving it from wherever it was), unconditionally."""
        self.client.set_registered_model_alias(version.name, alias, version.version)

    def compare_and_set_alias(self, version: ModelVersion, alias: str, expected: str | None,
                              timeout_s: float = LOCK_TIMEOUT_S, stale_s: float = LOCK_STALE_S
                              ) -> tuple[bool, ModelVersion | None]:
        """Point ``alias`` at ``version`` only if it still points at version ``expected`` (None: the
        alias does not exist yet). Returns (moved, the version the alias points at afterwards).

        MLflow's alias update is last-writer-wins, so the read and the write happen under the
        registry's alias lock (:meth:`lock`): two register stages that both decided against the
        same champion cannot both move the alias; the second finds it moved and must decide again.
        """
        with self.lock(f"{version.name}{LOCK_SUFFIX}", timeout_s, stale_s):
            now = self.by_alias(version.name, alias)
            if (now.version if now else None) != expected:
                return False, now
            self.set_alias(version, alias)
        return True, version

    @contextmanager
    def lock(self, name: str, timeout_s: float = LOCK_TIMEOUT_S, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
        """A mutex every client of this tracking store shares, whatever the backend (SQLite file,
        PostgreSQL behind a server): the registered model ``name`` itself. Creating a registered
        model is atomic in MLflow's stores (a unique name; a second create fails with
        RESOURCE_ALREADY_EXISTS), so whoever creates it holds the lock, and deleting it releases it.

        A lock left by a holder that died is broken once it has stayed the same lock (its token)
        for ``stale_s`` seconds of this process's clock (no clock shared with other machines is
        assumed); the sections it guards take milliseconds. Waiting longer than ``timeout_s``
        stops with a clear error.
        """
        token = uuid.uuid4().hex
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        deadline = time.monotonic() + timeout_s
        seen: tuple[str, float] | None = None  # (the held lock's token, when this process first saw it)
        while True:
            try:
                self.client.create_registered_model(
                    name, tags={LOCK_TOKEN_TAG: token, "aigc.lock.holder": holder},
                    description="aigc's registry lock, held for milliseconds while an alias moves; "
                                "delete it only if its holder is dead")
                break
            except MlflowException as exc:
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                    raise
            held = self._model(name)
            if held is not None:
                other = (held.tags or {}).get(LOCK_TOKEN_TAG, "?")
                if seen is None or seen[0] != other:
                    seen = (other, time.monotonic())
                elif time.monotonic() - seen[1] > stale_s:
                    self._release(name, other)  # its holder died inside the section: break it
                    seen = None
                    continue
                if time.monotonic() > deadline:
                    who = (held.tags or {}).get("aigc.lock.holder", "unknown")
                    raise UserError(f"the registry lock {name!r} in {self.uri} has been held for more than "
                                    f"{timeout_s:g} s (by {who}); if that process is gone and the lock is not "
                                    f"broken automatically (deleting it needs MANAGE permission on a server "
                                    f"with authentication), delete the registered model {name!r} by hand")
            time.sleep(random.uniform(0.05, 0.25))  # jitter: waiters do not retry in lockstep
        try:
            yield
        finally:
            self._release(name, token)

    def _release(self, name: str, token: str) -> None:
        """Delete the lock ``name`` if it is still the one with ``token`` (never a newer holder's)."""
        held = self._model(name)
        if held is None or (held.tags or {}).get(LOCK_TOKEN_TAG) != token:
            return
        try:
            self.client.delete_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise

    def resolve(self, uri: str) -> ModelVersion:
        """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the version; a clear error for an
        unknown model, alias or version."""
        m = re.fullmatch(r"models:/([^@/]+)(?:@([^/]+)|/(\d+))", uri)
        if not m:
            raise UserError(f"{uri!r} is not a registered-model URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
        name, alias, number = m.groups()
        model = self._model(name)
        if model is None:
            known = sorted(r.name for r in self.client.search_registered_models() if not r.name.endswith(LOCK_SUFFIX))
            raise UserError(f"no registered model {name!r} in {self.uri}; registered: "
                            f"{', '.join(known) if known else 'none yet (dvc repro registers one)'}")
        aliases = dict(model.aliases or {})
        if alias is not None:
            if alias not in aliases:
                have = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
                raise UserError(f"model {name!r} has no alias {alias!r} in {self.uri}; its aliases: {have}")
            number = aliases[alias]
        try:
            return _version(self.client.get_model_version(name, number))
        except MlflowException:
            versions = sorted(int(mv.version) for mv in self.client.search_model_versions(f"name = '{name}'"))
            raise UserError(f"model {name!r} has no version {number} in {self.uri}; versions: "
                            f"{', '.join(map(str, versions)) or 'none'}") from None

    def download(self, version: ModelVersion, dst: str | Path) -> dict[str, Path]:
        """Download a version's pyfunc model into ``dst``; returns its artifact files by name
        (``{"generator": .../generator.pt, "evaluator": ...}``)."""
        import mlflow.artifacts
        from mlflow.models import Model

        source = self.client.get_model_version_download_uri(version.name, version.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=self.uri,
                                                         registry_uri=self.uri))
        flavor = Model.load(str(local)).flavors.get("python_function", {})
        return {key: local / spec["path"] for key, spec in (flavor.get("artifacts") or {}).items()}

