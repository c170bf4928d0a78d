-- The seed's table for the embedded store: same columns and meaning.
CREATE TABLE IF NOT EXISTS domains (
  domain TEXT NOT NULL PRIMARY KEY,
  relay_host TEXT NOT NULL,
  relay_port INTEGER NOT NULL CHECK (relay_port BETWEEN 0 AND 99999),
  enable_virus_spam_scan TEXT NOT NULL DEFAULT '1'
);
