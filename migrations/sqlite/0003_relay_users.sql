-- SMTP AUTH credentials (permit_sasl_authenticated), as in MySQL.
CREATE TABLE IF NOT EXISTS relay_users (
  username TEXT NOT NULL PRIMARY KEY,
  password_hash TEXT NOT NULL,
  created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
