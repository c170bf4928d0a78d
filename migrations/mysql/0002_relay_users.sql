-- SMTP AUTH credentials (permit_sasl_authenticated). Passwords are Argon2id
-- PHC strings written by `mxrelay users add`; never plain text.
CREATE TABLE IF NOT EXISTS relay_users (
  username VARCHAR(255) NOT NULL PRIMARY KEY,
  password_hash VARCHAR(255) NOT NULL,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
