"""The gallery schema, versioned: each migration is applied once, by whichever process gets there first.

Every process migrates on its first connection. A transaction-scoped advisory
lock makes the others wait and then find the work done, so many workers
starting at once against a new database are safe. A database migrated by a
newer release than this one is refused rather than written to.

Per-gallery template tables (``ident_templates_<id>``) are not migrations:
galleries/store.py creates one when a gallery is created, so each gallery
has its own HNSW index and a search never filters after the index.
"""

from __future__ import annotations

import psycopg

from tasks.errors import ConfigurationError

# pg_advisory_xact_lock key for schema changes ("ident" in ASCII, as a number).
LOCK_KEY = 0x6964656E74

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "galleries and the models of their templates",
        """
        CREATE TABLE ident_models (
            id smallserial PRIMARY KEY,
            key text NOT NULL,
            sha256 text NOT NULL,
            dimensions integer NOT NULL CHECK (dimensions > 0),
            UNIQUE (key, sha256)
        );
        CREATE TABLE ident_galleries (
            id bigserial PRIMARY KEY,
            name text NOT NULL UNIQUE,
            modality text NOT NULL CHECK (modality IN ('vision', 'audio')),
            model_id smallint NOT NULL REFERENCES ident_models (id),
            -- NULL: the model's calibrated threshold.
            threshold real CHECK (threshold BETWEEN -1 AND 1),
            created_at timestamptz NOT NULL DEFAULT now(),
            -- When the gallery's HNSW index was built; NULL while it is searched exactly.
            indexed_at timestamptz
        );
        """,
    ),
)
LATEST = MIGRATIONS[-1][0]


def migrate(connection: psycopg.Connection) -> int:
    """Apply the migrations this database lacks; returns its schema version."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS ident_schema_migrations ("
            " version integer PRIMARY KEY, description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        applied = {row[0] for row in connection.execute("SELECT version FROM ident_schema_migrations")}
        newer = sorted(v for v in applied if v > LATEST)
        if newer:
            raise ConfigurationError(
                f"the gallery database is at schema version {newer[-1]}, newer than this release knows "
                f"({LATEST}): run the release that migrated it, or a newer one"
            )
        for version, description, statements in MIGRATIONS:
            if version in applied:
                continue
            connection.execute(statements)
            connection.execute(
                "INSERT INTO ident_schema_migrations (version, description) VALUES (%s, %s)", (version, description)
            )
    return LATEST
