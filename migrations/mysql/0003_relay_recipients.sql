-- Recipient validation (Postfix relay_recipient_maps), managed with
-- `mxrelay recipients`. The seed's `domains` table is never altered: the
-- method per domain lives here ('table': only the addresses below, and
-- '@domain' catch-alls, are accepted; a domain without a row accepts every
-- recipient, as the seed does).
CREATE TABLE IF NOT EXISTS relay_recipient_checks (
  domain VARCHAR(255) NOT NULL PRIMARY KEY,
  method VARCHAR(16) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Lower-case addresses (local@domain, the domain as A-labels), or
-- '@domain' for every address of that domain.
CREATE TABLE IF NOT EXISTS relay_recipients (
  address VARCHAR(320) NOT NULL PRIMARY KEY
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
