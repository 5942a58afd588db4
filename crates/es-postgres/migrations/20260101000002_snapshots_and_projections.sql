-- Latest snapshot per stream: loading = snapshot + later events.
CREATE TABLE snapshots (
    stream_id         text        PRIMARY KEY,
    version           bigint      NOT NULL,
    -- Shape of `state`; a snapshot of another shape is ignored (full replay).
    snapshot_version  integer     NOT NULL,
    state             jsonb       NOT NULL,
    first_at          timestamptz NOT NULL,
    last_at           timestamptz NOT NULL
);

-- Read models are versioned by generation: queries read the live one, a
-- rebuild fills the next one beside it and then switches.
CREATE TABLE projections (
    name                 text        PRIMARY KEY,
    live_generation      integer     NOT NULL DEFAULT 1,
    building_generation  integer,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Where each generation of each projection has got to; written in the same
-- transaction as the read model rows.
CREATE TABLE projection_checkpoints (
    name        text        NOT NULL,
    generation  integer     NOT NULL,
    tx_id       xid8        NOT NULL,
    position    bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, generation)
);
