"""The graph store: the official neo4j driver over Bolt, to Neo4j 5 or to the embedded ArcadeDB server.

One code path for both servers. Writes go through named, parameterised statements (:mod:`ogclip_kg.cypher`) in
batches. Analysts' queries run as a separate, read-only account whose permissions the server enforces (on the
embedded server the ``analyst`` user of :mod:`ogclip_kg.server`; on Neo4j the configured analyst user, in a READ
access-mode session), with a server-side time limit, after a text check that refuses writes, administration and
procedures, and in a transaction that is always rolled back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import neo4j
from neo4j import GraphDatabase
from neo4j.exceptions import AuthError, DriverError, Forbidden, Neo4jError, ServiceUnavailable

from ogclip.settings import Settings
from ogclip_kg import cypher
from ogclip_kg.server import ANALYST_USER, EMBEDDED_USER, TIME_LIMIT, analyst_password, bolt_uri, embedded_password
from ogclip_kg.server import status as embedded_status

DEFAULT_BATCH = 2000


class GraphError(RuntimeError):
    """A graph operation failed; the message says what and where."""


class GraphConnectionError(GraphError):
    """The server cannot be reached or refused the credentials."""


class ReadOnlyViolation(GraphError):
    """An analyst query tried to write or administer the graph (refused by the text check or by the server)."""


class QueryTimeout(GraphError):
    """The server stopped an analyst query at its time limit."""


def _timed_out(exc: Neo4jError) -> bool:
    """Whether the server ended the query for time: Neo4j's transaction timeout, the analyst group's read timeout
    ("Timeout on iteration") or the embedded server's watchdog."""
    text = f"{exc.code or ''} {exc.message or ''}"
    return "TimedOut" in text or "timeout" in text.lower() or TIME_LIMIT in text


def _batches(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class GraphStore:
    """A connection to one graph database. Use as a context manager or call :meth:`close`."""

    def __init__(self, uri: str, user: str, password: str, database: str,
                 analyst: tuple[str, str] | None = None, query_timeout_s: float = 30.0) -> None:
        """``analyst`` is the (user, password) that :meth:`analyst_query` runs as; None runs it as ``user``, which is
        read-only only where the server enforces READ access mode (Neo4j does, ArcadeDB does not)."""
        self.uri, self.user, self.database = uri, user, database
        self.query_timeout_s = query_timeout_s
        self._analyst_auth = analyst
        self._analyst_driver: neo4j.Driver | None = None
        self._driver = self._connect(user, password)

    def _connect(self, user: str, password: str) -> neo4j.Driver:
        driver = GraphDatabase.driver(self.uri, auth=(user, password), connection_timeout=10.0)
        try:
            driver.verify_connectivity()
        except AuthError as exc:
            driver.close()
            raise GraphConnectionError(f"authentication failed for user {user!r} at {self.uri}") from exc
        except (ServiceUnavailable, OSError) as exc:
            driver.close()
            raise GraphConnectionError(f"no graph server answers at {self.uri} ({exc})") from exc
        return driver

    @classmethod
    def from_settings(cls, settings: Settings) -> GraphStore:
        """Neo4j when ``OGCLIP_NEO4J_URI`` is set, else the embedded server (which must be up: ``ogclip kg up``)."""
        timeout = settings.kg_query_timeout_s
        if settings.neo4j_uri:
            if settings.neo4j_password is None:
                raise GraphConnectionError("OGCLIP_NEO4J_PASSWORD must be set with OGCLIP_NEO4J_URI")
            analyst = None
            if settings.neo4j_analyst_user:
                if settings.neo4j_analyst_password is None:
                    raise GraphConnectionError("OGCLIP_NEO4J_ANALYST_PASSWORD must be set with "
                                               "OGCLIP_NEO4J_ANALYST_USER")
                analyst = (settings.neo4j_analyst_user, settings.neo4j_analyst_password.get_secret_value())
            password = settings.neo4j_password.get_secret_value()
            return cls(settings.neo4j_uri, settings.neo4j_user, password, settings.neo4j_database, analyst, timeout)
        if not embedded_status(settings).running:
            raise GraphConnectionError(f"the embedded graph server is not running at {bolt_uri(settings)}; "
                                       "start it with `ogclip kg up`")
        return cls(bolt_uri(settings), EMBEDDED_USER, embedded_password(settings), settings.neo4j_database,
                   (ANALYST_USER, analyst_password(settings)), timeout)

    def close(self) -> None:
        if self._analyst_driver is not None:
            self._analyst_driver.close()
        self._driver.close()

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- primitives ------------------------------------------------------------------------------------------

    def read(self, query: str, **params: Any) -> list[dict[str, Any]]:
        """Run one of the platform's read statements."""
        try:
            with self._driver.session(database=self.database, default_access_mode=neo4j.READ_ACCESS) as session:
                return session.run(query, params).data()
        except Neo4jError as exc:
            raise GraphError(f"read failed: {exc.message or exc}") from exc

    def write(self, query: str, **params: Any) -> list[dict[str, Any]]:
        """Run one of the platform's write statements in its own transaction."""
        try:
            with self._driver.session(database=self.database) as session:
                return session.execute_write(lambda tx: tx.run(query, params).data())
        except Neo4jError as exc:
            raise GraphError(f"write failed: {exc.message or exc}") from exc

    def write_rows(self, query: str, rows: Iterable[dict[str, Any]], batch_size: int = DEFAULT_BATCH) -> int:
        """Run an ``UNWIND $rows`` statement over ``rows`` in batches (one transaction each); returns the row count."""
        count = 0
        for batch in _batches(rows, batch_size):
            self.write(query, rows=batch)
            count += len(batch)
        return count

    def upsert(self, label: str, rows: Iterable[dict[str, Any]]) -> int:
        """MERGE nodes by key: rows of ``{"key": ..., "props": {...}}``."""
        return self.write_rows(cypher.upsert(label), rows)

    def link(self, from_label: str, rel: str, to_label: str, rows: Iterable[dict[str, Any]]) -> int:
        """MERGE relationships: rows of ``{"from": key, "to": key, "props": {...}}``."""
        return self.write_rows(cypher.link(from_label, rel, to_label), rows)

    # -- class embeddings (the contract with serving) ----------------------------------------------------------

    def write_embeddings(self, model_version: str, embeddings: dict[str, Sequence[float]],
                         prompts: dict[str, list[str]] | None = None) -> int:
        """Store one text embedding per class under ``model_version``; all or nothing on bad input.

        Every vector of a version must have the same dimension (also across calls) and finite values, and every
        key must name an existing target; otherwise ValueError, and nothing is written.
        """
        if not model_version or not isinstance(model_version, str):
            raise ValueError("model_version must be a non-empty string")
        vectors = {key: [float(x) for x in vector] for key, vector in embeddings.items()}
        dims = {len(v) for v in vectors.values()}
        stored = self.read(cypher.EMBEDDING_DIM, model_version=model_version)
        if stored:
            dims.add(stored[0]["dim"])
        if len(dims) > 1:
            raise ValueError(f"embeddings of {model_version} must share one dimension; got {sorted(dims)}")
        if any(not math.isfinite(x) for v in vectors.values() for x in v) or 0 in dims:
            raise ValueError("embeddings must be non-empty and finite")
        found = {row["key"] for row in self.read(cypher.EXISTING_TARGETS, keys=list(vectors))}
        unknown = sorted(set(vectors) - found)
        if unknown:
            raise ValueError(f"unknown classes: {', '.join(unknown[:10])}")
        rows = [{"key": f"{model_version}:{key}", "target_key": key, "model_version": model_version,
                 "dim": len(vector), "vector": vector, "prompts": (prompts or {}).get(key, [])}
                for key, vector in vectors.items()]
        return self.write_rows(cypher.WRITE_EMBEDDINGS, rows, batch_size=500)

    def read_embeddings(self, model_version: str) -> dict[str, list[float]]:
        """The class embeddings stored under ``model_version`` (empty if none)."""
        return {row["target_key"]: row["vector"] for row in self.read(cypher.READ_EMBEDDINGS,
                                                                      model_version=model_version)}

    # -- analysts ----------------------------------------------------------------------------------------------

    def analyst_query(self, query: str, params: dict[str, Any] | None = None, limit: int = 1000) -> list[dict]:
        """Run a person's Cypher, read-only, and return at most ``limit`` rows.

        The one way the platform runs Cypher it did not write. Refused here when :func:`cypher.read_only_violation`
        finds a reason; otherwise run as the analyst account (whose permissions the server enforces) in a READ
        access-mode transaction with the server-side timeout, read up to ``limit`` rows and rolled back. A refusal by
        the server raises :class:`ReadOnlyViolation` too; the server's time limit, :class:`QueryTimeout`; any other
        failure, a lost connection included, :class:`GraphError`.
        """
        reason = cypher.read_only_violation(query)
        if reason:
            raise ReadOnlyViolation(f"refused: {reason}")
        if self._analyst_driver is None:
            try:
                self._analyst_driver = self._connect(*self._analyst_auth) if self._analyst_auth else self._driver
            except GraphConnectionError as exc:
                if self._analyst_auth[0] != ANALYST_USER:
                    raise
                raise GraphConnectionError(f"{exc} (an embedded server started before it had an analyst account "
                                           "needs a restart: `ogclip kg down`, then `ogclip kg up`)") from exc
        try:
            with self._analyst_driver.session(database=self.database,
                                              default_access_mode=neo4j.READ_ACCESS) as session:
                tx = session.begin_transaction(timeout=self.query_timeout_s)
                try:
                    rows = []
                    for record in tx.run(query, params or {}):
                        rows.append(record.data())
                        if len(rows) >= limit:
                            break
                    return rows
                finally:
                    tx.rollback()
        except Forbidden as exc:
            raise ReadOnlyViolation(f"refused by the server: {exc.message or exc}") from exc
        except Neo4jError as exc:
            if _timed_out(exc):
                raise QueryTimeout(f"stopped by the server at its time limit of {self.query_timeout_s:g} s "
                                   f"({exc.message or exc})") from exc
            raise GraphError(f"query failed: {exc.message or exc}") from exc
        except DriverError as exc:  # the connection died under the query (e.g. the server ran out of memory)
            raise GraphError(f"the graph server dropped the query's connection ({type(exc).__name__}: {exc}); the "
                             "query did not finish and wrote nothing") from exc
        except RecursionError as exc:  # the driver reads a nested value recursively: [[[...]]] 2,000 deep is too much
            raise GraphError("the query's result nests lists or maps too deeply to be read (hundreds of levels); "
                             "nothing was written") from exc

    # -- whole-graph operations --------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Number of nodes of each label."""
        return {lab: self.read(q)[0]["n"] for lab, q in cypher.COUNT_LABEL.items()}

    def clear(self) -> None:
        """Delete every node and relationship (the schema stays)."""
        self.write(cypher.DELETE_ALL)

    def export_jsonl(self, path: str | Path) -> int:
        """Write every node and relationship as JSON lines; returns the number of lines."""
        lines = 0
        with Path(path).open("w") as handle:
            for lab, query in cypher.EXPORT_NODES.items():
                for row in self.read(query):
                    props = {k: v for k, v in row["props"].items() if k != "key"}
                    handle.write(json.dumps({"node": lab, "key": row["key"], "props": props}, sort_keys=True) + "\n")
                    lines += 1
            for rel, query in cypher.EXPORT_RELATIONSHIPS.items():
                for row in self.read(query):
                    from_label = next(lab for lab in row["from_labels"] if lab in cypher.LABELS)
                    to_label = next(lab for lab in row["to_labels"] if lab in cypher.LABELS)
                    record = {"rel": rel, "from": [from_label, row["from"]], "to": [to_label, row["to"]],
                              "props": row["props"]}
                    handle.write(json.dumps(record, sort_keys=True) + "\n")
                    lines += 1
        return lines

    def import_jsonl(self, path: str | Path) -> int:
        """Load JSON lines written by :meth:`export_jsonl` (MERGE, so importing twice changes nothing).

        Every line is validated before anything is written: an unknown label or relationship type, or a malformed
        line, fails the whole import with its line number.
        """
        nodes: dict[str, list[dict]] = {}
        rels: dict[tuple[str, str, str], list[dict]] = {}
        with Path(path).open() as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if "node" in record:
                        nodes.setdefault(cypher.label(record["node"]), []).append(
                            {"key": str(record["key"]), "props": dict(record.get("props") or {})})
                    else:
                        (from_label, from_key), (to_label, to_key) = record["from"], record["to"]
                        group = (cypher.label(from_label), cypher.relationship(record["rel"]), cypher.label(to_label))
                        rels.setdefault(group, []).append(
                            {"from": str(from_key), "to": str(to_key), "props": dict(record.get("props") or {})})
                except (ValueError, KeyError, TypeError) as exc:
                    raise GraphError(f"{path}:{number}: invalid graph line ({exc})") from exc
        total = sum(self.upsert(lab, rows) for lab, rows in nodes.items())
        total += sum(self.link(*group, rows) for group, rows in rels.items())
        return total
