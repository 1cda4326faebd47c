-- Which Unlock call (its caller's idempotency key) released a case's social side, learnt from the
-- registry's SocialUnlocked event (its key is `unlock:<key>:social`). An Unlock whose registry call
-- committed but whose answer was never stored (a crash, a lost reply) finds its case here when the
-- caller retries, even after the event closed the case.
CREATE TABLE unlocked_by (
    unlock_key TEXT PRIMARY KEY,
    case_id    TEXT NOT NULL
);
