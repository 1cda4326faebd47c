-- The financial function's freezes (R26, R27): one row per card, the current or last freeze.
CREATE TABLE freezes (
    card_id        TEXT PRIMARY KEY,
    card_number    TEXT NOT NULL,
    case_id        TEXT NOT NULL,
    -- 'temporary' | 'written'
    loss_kind      TEXT NOT NULL,
    frozen_at      INTEGER NOT NULL,
    released_at    INTEGER,
    -- 'unlocked' | 'expired'
    release_reason TEXT
);
