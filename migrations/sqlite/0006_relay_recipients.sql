-- Recipient validation (Postfix relay_recipient_maps); see the MySQL
-- migration of the same name.
CREATE TABLE IF NOT EXISTS relay_recipient_checks (
  domain TEXT NOT NULL PRIMARY KEY,
  method TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS relay_recipients (
  address TEXT NOT NULL PRIMARY KEY
);
