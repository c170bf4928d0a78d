-- The seed's table, created only when absent: an existing seed table
-- (MyISAM, latin1) is used as it is and never altered.
CREATE TABLE IF NOT EXISTS `domains` (
  `domain` VARCHAR(255) NOT NULL,
  `relay_host` VARCHAR(512) NOT NULL,
  `relay_port` INT(5) UNSIGNED NOT NULL,
  `enable_virus_spam_scan` VARCHAR(1) NOT NULL DEFAULT '1',
  PRIMARY KEY (`domain`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
