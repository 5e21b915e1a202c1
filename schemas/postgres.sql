-- kdedup's PostgreSQL store. Applied by `kdedup schema apply --config FILE`
-- (idempotent), printed by `kdedup schema print`.
--
-- One row per (scope, event_id). Times are milliseconds since the Unix epoch,
-- from the kdedup processes' clocks: keep lease_secs well above their skew.
--
-- Expiry: a row past expires_at stops counting at once (every statement
-- checks it); the sweeper deletes expired rows in bounded chunks of
-- ctid-addressed rows through the expires_at index. Bounded deletes were
-- chosen over time-partitioned tables: no partition lifecycle to run, each
-- chunk holds its row locks for milliseconds, and autovacuum reclaims the
-- space; at volumes where vacuum cannot keep up, partition by expires_at.
CREATE TABLE IF NOT EXISTS kdedup_claims (
    scope        text     NOT NULL,
    event_id     bytea    NOT NULL,
    state        smallint NOT NULL,          -- 1 = in flight, 2 = done
    fingerprint  bytea    NOT NULL,          -- 16 bytes
    topic        text     NOT NULL,          -- the claimant's position
    partition    integer  NOT NULL,
    "offset"     bigint   NOT NULL,
    claimed_at   bigint   NOT NULL,
    lease_until  bigint   NOT NULL,          -- in flight: when another owner may take over
    expires_at   bigint   NOT NULL,          -- claimed_at + ttl
    PRIMARY KEY (scope, event_id)
);

CREATE INDEX IF NOT EXISTS kdedup_claims_expires_at ON kdedup_claims (expires_at);

-- The effect's recorded response (JSON: status, body hash, excerpt, time),
-- set once the effect answered; cleared by a new claim of the key.
ALTER TABLE kdedup_claims ADD COLUMN IF NOT EXISTS response text;
