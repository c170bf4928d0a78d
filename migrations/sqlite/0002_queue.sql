-- The embedded queue (single node): the same states as the Redis model.
CREATE TABLE IF NOT EXISTS queue_messages (
  id TEXT PRIMARY KEY,
  envelope TEXT NOT NULL,            -- JSON: the Envelope
  received_at INTEGER NOT NULL,      -- unix ms
  state TEXT NOT NULL,               -- ready | deferred | held
  due INTEGER NOT NULL DEFAULT 0,    -- next attempt (unix ms) when deferred
  lease_owner TEXT,                  -- node delivering it
  lease_until INTEGER,               -- unix ms
  generation INTEGER NOT NULL DEFAULT 0  -- bumped per lease: the "stream entry"
);
CREATE INDEX IF NOT EXISTS queue_ready ON queue_messages (state, lease_owner, received_at);
CREATE INDEX IF NOT EXISTS queue_due ON queue_messages (state, due);
CREATE TABLE IF NOT EXISTS queue_bodies (
  id TEXT NOT NULL,
  offset INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (id, offset)
);
CREATE TABLE IF NOT EXISTS queue_destinations (
  destination TEXT NOT NULL,
  id TEXT NOT NULL,
  PRIMARY KEY (destination, id)
);
