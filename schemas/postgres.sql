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

-- The changes below run only when they are still missing. Each takes a lock on
-- the table that waits for the claims in flight, and that new claims then queue
-- behind, so re-applying the schema beside live members (every deploy's
-- `kdedup schema apply`) must not issue them: the test suite saw such an apply
-- end in a deadlock (40P01) beside running claims.
--
-- kdedup_claims_expires_at serves the sweeper.
--
-- fillfactor 50: half of each page is left free so that a claim's one update
-- (completion, or a lease renewal) fits beside it on the same page: a heap-only
-- (HOT) update, which writes no new entries into either index. At 100 (the
-- default) a page full of fresh claims has no room: completing 1000 keys wrote
-- a new heap tuple and an entry in each index per key (4,031 WAL records), and
-- 89 of 468,000 updates were HOT. Measured here with 16 clients each claiming
-- and completing 1000 keys per statement pair: 48 pairs/s at 100, 69 at 50,
-- and fewer bytes per key on disk (267 vs 300: no index entries for dead
-- versions). Takes effect for pages written from then on.
--
-- response: the effect's recorded response (JSON: status, body hash, excerpt,
-- time), set once the effect answered; cleared by a new claim of the key.
DO $$
BEGIN
    IF to_regclass('kdedup_claims_expires_at') IS NULL THEN
        CREATE INDEX kdedup_claims_expires_at ON kdedup_claims (expires_at);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class
                   WHERE oid = 'kdedup_claims'::regclass
                     AND reloptions @> ARRAY['fillfactor=50']) THEN
        ALTER TABLE kdedup_claims SET (fillfactor = 50);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'kdedup_claims'::regclass
                     AND attname = 'response' AND NOT attisdropped) THEN
        ALTER TABLE kdedup_claims ADD COLUMN response text;
    END IF;
END
$$;
