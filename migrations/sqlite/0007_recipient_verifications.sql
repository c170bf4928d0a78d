-- The recipient verification cache (verify.*, `mxrelay recipients
-- verify-cache`): what a domain's own server said of an address, until
-- expires_at (unix ms). One node: no claims are needed across nodes.
CREATE TABLE IF NOT EXISTS recipient_verifications (
  address TEXT NOT NULL PRIMARY KEY,
  deliverable INTEGER NOT NULL,
  reply TEXT NOT NULL,
  asked_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS recipient_verifications_expiry ON recipient_verifications (expires_at);
