//! Loading: the TOML file, the `MXRELAY_*` variables over it, then one
//! deserialisation into [`Config`] and [`Config::check`]. Every error names
//! the full key path (`smtp.command_timeout`), the variable when the value
//! came from the environment, the bad value and the fix; one load reports
//! every bad key, not only the first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_path_to_error::Segment;

use super::{Config, ConfigError, ENV_PREFIX};

/// Key path → the variable that set it.
type EnvKeys = BTreeMap<String, String>;

/// Most type errors reported from one load; beyond them the rest is noise.
const MAX_TYPE_ERRORS: usize = 50;

/// Integer keys counted in bytes, so their fix says so.
const BYTE_KEYS: &[&str] =
    &["message_size_limit", "queue.chunk_size", "scan.max_size", "scan.memory_limit", "smtp.min_data_rate"];

/// How to write the keys whose values are more than a string, a number or
/// a flag (addresses, networks, levels).
const TYPED_FIXES: &[(&str, &str)] = &[
    ("smtp.listen", "write it as ip:port, e.g. 127.0.0.1:2525 or [::1]:2525"),
    ("admin.listen", "write it as ip:port, e.g. 127.0.0.1:9425 or [::1]:9425"),
    ("tls.implicit_listen", "write it as ip:port, e.g. 0.0.0.0:465, or \"\" for none"),
    ("mynetworks", "use entries like 127.0.0.1/32, 192.0.2.0/24 or [::1]/128"),
    ("smtp.proxy_networks", "list your load balancers' addresses, e.g. 10.0.0.0/24"),
    ("dns.nameservers", "use entries like 127.0.0.1 or 127.0.0.1:5353"),
    ("tls.security_level", "use \"none\", \"may\" or \"encrypt\""),
    ("scan.on_failure", "use \"tempfail\" (451, the default) or \"accept\""),
    ("verify.unreachable", "use \"accept\" (the default) or \"tempfail\" (450)"),
    ("log.format", "use \"text\" or \"json\""),
    ("delivery.tls_policy", "use one of \"none\", \"may\", \"encrypt\", \"verify\""),
    ("delivery.tls_policy_map", "give each domain one of \"none\", \"may\", \"encrypt\", \"verify\""),
];

impl Config {
    pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, Vec<ConfigError>> {
        Self::load_checked(file, env, |_| Vec::new())
    }

    /// [`Config::load_from`] with the file checks of [`Config::load_with`].
    pub fn load_checked(
        file: Option<&Path>,
        env: &[(String, String)],
        files: impl Fn(&Config) -> Vec<ConfigError>,
    ) -> Result<Config, Vec<ConfigError>> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    vec![ConfigError::new(
                        "--config",
                        format!("cannot read {}: {e}", path.display()),
                        "pass the path of a readable TOML file",
                    )]
                })?;
                text.parse::<toml::Table>().map_err(|e| {
                    vec![ConfigError::new(
                        &path.display().to_string(),
                        format!("not valid TOML: {e}"),
                        "correct the syntax at the position shown",
                    )]
                })?
            }
            None => toml::Table::new(),
        };
        let default = Config::default();
        let defaults = toml::Table::try_from(&default).unwrap_or_default();
        let mut errors = Vec::new();
        let from_env = apply_env(&mut table, env, &defaults, &mut errors);
        let mut config = deserialize(table, &default, &defaults, &from_env, &mut errors);
        // Unset stores mean the embedded one, in data_dir.
        let embedded = format!("sqlite://{}/mxrelay.db", config.data_dir.trim_end_matches('/'));
        for url in [&mut config.domains.url, &mut config.queue.url] {
            if url.trim().is_empty() {
                *url = embedded.clone();
            }
        }
        // Passwords from files (Kubernetes Secrets) go into the URLs, which
        // every later step (and `check-config`'s masking) already handles.
        for (key, file, url) in [
            ("domains.password_file", &config.domains.password_file, &mut config.domains.url),
            ("queue.password_file", &config.queue.password_file, &mut config.queue.url),
        ] {
            if file.is_empty() {
                continue;
            }
            match std::fs::read_to_string(file) {
                Ok(text) => *url = super::with_password(url, text.trim_end_matches(['\r', '\n'])),
                Err(e) => errors.push(
                    ConfigError::new(
                        key,
                        format!("cannot read {file:?}: {e}"),
                        "point it at a readable file holding only the password",
                    )
                    .naming_env(&from_env),
                ),
            }
        }
        let problems = config.check().err().unwrap_or_default().into_iter().chain(files(&config));
        // A key refused above holds its default now: what the checks say of it is noise.
        let refused: BTreeSet<String> = errors.iter().map(|e| e.key.clone()).collect();
        let problems: Vec<ConfigError> = problems.filter(|e| !refused.contains(&e.key)).collect();
        errors.extend(problems.into_iter().map(|e| e.naming_env(&from_env)));
        if errors.is_empty() { Ok(config) } else { Err(errors) }
    }
}

impl ConfigError {
    /// Names the variable too when `key` was set by one.
    fn naming_env(mut self, from_env: &EnvKeys) -> Self {
        self.env = from_env.get(&self.key).cloned();
        self
    }
}

/// Deserialises `table` into a [`Config`]. A value that does not fit is
/// reported, dropped (its default stands in) and the rest tried again, so
/// every bad key is named; serde alone stops at the first.
fn deserialize(
    mut table: toml::Table,
    default: &Config,
    defaults: &toml::Table,
    from_env: &EnvKeys,
    errors: &mut Vec<ConfigError>,
) -> Config {
    for _ in 0..MAX_TYPE_ERRORS {
        let e = match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table.clone())) {
            Ok(config) => return config,
            Err(e) => e,
        };
        // The key is the table path; an index into a list is detail for the message.
        let path: Vec<String> = e
            .path()
            .iter()
            .map_while(|s| match s {
                Segment::Map { key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let key = if path.is_empty() { "config".to_string() } else { path.join(".") };
        let full = e.path().to_string();
        let mut problem =
            if full == key { e.inner().message().to_string() } else { format!("at {full}: {}", e.inner().message()) };
        let known = lookup(defaults, &path);
        if let Some(raw) = lookup(&table, &path).and_then(scalar)
            && known.is_some()
            && !problem.contains(&raw)
        {
            problem = format!("{problem} (got {raw})");
        }
        let fix = fix_for(&key, known, default);
        errors.push(ConfigError::new(&key, problem, fix).naming_env(from_env));
        if path.is_empty() || remove_path(&mut table, &path).is_none() {
            break;
        }
    }
    default.clone()
}

/// How to write a value of `key`, judged by its default's kind.
fn fix_for(key: &str, default_value: Option<&toml::Value>, default: &Config) -> String {
    let Some(value) = default_value else {
        return "check the spelling against the configuration reference in README.md".into();
    };
    if let Some((_, fix)) = TYPED_FIXES.iter().find(|(k, _)| *k == key) {
        return fix.to_string();
    }
    if default.durations().iter().any(|(k, _)| *k == key) {
        return "write a duration like \"30s\" or \"5m\"".into();
    }
    match value {
        toml::Value::Boolean(_) => "write true or false".into(),
        toml::Value::Integer(n) if BYTE_KEYS.contains(&key) => {
            format!("write a whole number of bytes without a unit, e.g. {n}")
        }
        toml::Value::Integer(n) => format!("write a whole number, e.g. {n}"),
        toml::Value::Array(_) => {
            "write a list of strings, e.g. [\"a\", \"b\"] (comma-separated in the environment)".into()
        }
        toml::Value::String(_) => "write a string in quotes".into(),
        _ => format!("see {key} in the configuration reference in README.md"),
    }
}

/// A scalar as written, for the message (strings without quotes).
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
        other => Some(other.to_string()),
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = table;
    for p in parents {
        t = t.get(p)?.as_table()?;
    }
    t.get(last)
}

fn remove_path(table: &mut toml::Table, path: &[String]) -> Option<toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = table;
    for p in parents {
        t = t.get_mut(p)?.as_table_mut()?;
    }
    t.remove(last)
}

/// Overlays `MXRELAY_*` variables on `table` and returns the keys they set.
/// Every known key path (taken from the defaults) has one variable name; an
/// unknown `MXRELAY_*` name is an error, so a typo never passes silently.
/// A value is read as the default's kind; one that does not fit is named by
/// [`deserialize`] with its key and variable.
fn apply_env(
    table: &mut toml::Table,
    env: &[(String, String)],
    defaults: &toml::Table,
    errors: &mut Vec<ConfigError>,
) -> EnvKeys {
    let mut keys = Vec::new();
    collect_keys(defaults, &mut Vec::new(), &mut keys);
    let mut set = EnvKeys::new();
    for (name, value) in env {
        let Some(suffix) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if suffix == "CONFIG" {
            continue; // MXRELAY_CONFIG names the file, it is not a key
        }
        let Some((path, default)) = keys.iter().find(|(path, _)| env_name(path) == suffix) else {
            errors.push(ConfigError::new(
                name,
                "no configuration key has this environment name",
                "check the spelling against the configuration reference (key path upper-cased, '.' → '_')",
            ));
            continue;
        };
        let parsed = match default {
            toml::Value::String(_) => toml::Value::String(value.clone()),
            toml::Value::Array(_) => toml::Value::Array(
                value.split([',', ' ']).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.to_string())).collect(),
            ),
            _ => match format!("v = {value}").parse::<toml::Table>() {
                Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(value.clone())),
                Err(_) => toml::Value::String(value.clone()),
            },
        };
        insert_path(table, path, parsed);
        set.insert(path.join("."), name.clone());
    }
    set
}

pub(super) fn collect_keys(t: &toml::Table, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, toml::Value)>) {
    for (k, v) in t {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(inner) => collect_keys(inner, prefix, out),
            other => out.push((prefix.clone(), other.clone())),
        }
        prefix.pop();
    }
}

fn env_name(path: &[String]) -> String {
    path.join("_").to_ascii_uppercase()
}

pub(super) fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, parents) = path.split_last().expect("key paths are never empty");
    let mut t = table;
    for p in parents {
        let entry = t.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn load_env(pairs: &[(&str, &str)]) -> Vec<ConfigError> {
        let env: Vec<(String, String)> = pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        Config::load_from(None, &env).expect_err("the configuration is refused")
    }

    fn load_toml(text: &str) -> Vec<ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        Config::load_from(Some(file.path()), &[]).expect_err("the configuration is refused")
    }

    /// The one error of `errors`, checked for key, variable and bad value.
    fn only<'a>(errors: &'a [ConfigError], key: &str, env: Option<&str>, value: &str) -> &'a ConfigError {
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = &errors[0];
        assert_eq!((e.key.as_str(), e.env.as_deref()), (key, env), "{e}");
        assert!(e.problem.contains(value), "{e}");
        e
    }

    #[test]
    fn negative_size_from_env_names_key_variable_and_value() {
        let errors = load_env(&[("MXRELAY_MESSAGE_SIZE_LIMIT", "-5")]);
        let e = only(&errors, "message_size_limit", Some("MXRELAY_MESSAGE_SIZE_LIMIT"), "-5");
        assert!(e.fix.contains("whole number of bytes"), "{e}");
        assert!(e.to_string().starts_with("message_size_limit (MXRELAY_MESSAGE_SIZE_LIMIT): "), "{e}");
    }

    #[test]
    fn size_with_unit_from_env_is_named() {
        let errors = load_env(&[("MXRELAY_MESSAGE_SIZE_LIMIT", "10MB")]);
        let e = only(&errors, "message_size_limit", Some("MXRELAY_MESSAGE_SIZE_LIMIT"), "10MB");
        assert!(e.fix.contains("without a unit"), "{e}");
    }

    #[test]
    fn negative_duration_from_env_is_named() {
        let errors = load_env(&[("MXRELAY_SMTP_COMMAND_TIMEOUT", "-3s")]);
        let e = only(&errors, "smtp.command_timeout", Some("MXRELAY_SMTP_COMMAND_TIMEOUT"), "-3s");
        assert!(e.fix.contains("\"30s\""), "{e}");
    }

    #[test]
    fn bad_bool_from_env_is_named() {
        let errors = load_env(&[("MXRELAY_SMTP_PROXY_PROTOCOL", "maybe")]);
        let e = only(&errors, "smtp.proxy_protocol", Some("MXRELAY_SMTP_PROXY_PROTOCOL"), "maybe");
        assert!(e.fix.contains("true or false"), "{e}");
    }

    #[test]
    fn every_bad_env_value_is_reported_at_once() {
        let errors = load_env(&[
            ("MXRELAY_MESSAGE_SIZE_LIMIT", "10MB"),
            ("MXRELAY_SMTP_COMMAND_TIMEOUT", "-3s"),
            ("MXRELAY_SMTP_PROXY_PROTOCOL", "maybe"),
            ("MXRELAY_SMTP_LISTN", "x"),
            ("MXRELAY_ADMIN_LISTEN", "nowhere"),
        ]);
        let mut keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["MXRELAY_SMTP_LISTN", "admin.listen", "message_size_limit", "smtp.command_timeout", "smtp.proxy_protocol"],
            "{errors:#?}"
        );
        let admin = errors.iter().find(|e| e.key == "admin.listen").unwrap();
        assert_eq!(admin.env.as_deref(), Some("MXRELAY_ADMIN_LISTEN"));
    }

    #[test]
    fn negative_size_in_file_is_named() {
        let errors = load_toml("message_size_limit = -5\n");
        only(&errors, "message_size_limit", None, "-5");
    }

    #[test]
    fn size_with_unit_in_file_is_named() {
        let errors = load_toml("message_size_limit = \"10MB\"\n");
        only(&errors, "message_size_limit", None, "10MB");
    }

    #[test]
    fn bad_duration_in_file_is_named_with_its_section() {
        let errors = load_toml("[smtp]\ncommand_timeout = \"-3s\"\n");
        only(&errors, "smtp.command_timeout", None, "-3s");
        // A bare number is not a duration either.
        let errors = load_toml("[delivery]\nconnect_timeout = 30\n");
        only(&errors, "delivery.connect_timeout", None, "30");
    }

    #[test]
    fn bad_bool_in_file_is_named() {
        let errors = load_toml("[smtp]\nproxy_protocol = \"maybe\"\n");
        only(&errors, "smtp.proxy_protocol", None, "maybe");
    }

    #[test]
    fn unknown_key_in_file_is_named_with_its_section_and_the_known_keys() {
        let errors = load_toml("[smtp]\nlistn = \"127.0.0.1:25\"\n");
        let e = only(&errors, "smtp.listn", None, "listn");
        assert!(e.problem.contains("`listen`"), "the section's keys are listed: {e}");
        assert!(e.fix.contains("README.md"), "{e}");
    }

    #[test]
    fn every_bad_key_in_a_file_is_reported() {
        let errors = load_toml(
            "message_size_limit = \"10MB\"\n[smtp]\nlistn = \"x\"\nproxy_protocol = \"maybe\"\n\
             [queue]\ntimeout = \"-1s\"\n",
        );
        let mut keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["message_size_limit", "queue.timeout", "smtp.listn", "smtp.proxy_protocol"], "{errors:#?}");
    }

    #[test]
    fn a_file_value_overridden_from_env_is_blamed_on_the_variable() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"[smtp]\ncommand_timeout = \"30s\"\n").unwrap();
        let env = vec![("MXRELAY_SMTP_COMMAND_TIMEOUT".to_string(), "0s".to_string())];
        let errors = Config::load_from(Some(file.path()), &env).unwrap_err();
        only(&errors, "smtp.command_timeout", Some("MXRELAY_SMTP_COMMAND_TIMEOUT"), "0s");
    }

    #[test]
    fn byte_keys_are_integer_keys() {
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for key in BYTE_KEYS {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            assert!(matches!(lookup(&defaults, &path), Some(toml::Value::Integer(_))), "{key}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn env_overrides_nested_and_top_level_keys() {
        let c = Config::load_from(
            None,
            &env(&[
                ("MXRELAY_SMTP_LISTEN", "127.0.0.1:2600"),
                ("MXRELAY_MESSAGE_SIZE_LIMIT", "1048576"),
                ("MXRELAY_DOMAINS_REFRESH", "5s"),
                ("MXRELAY_MYNETWORKS", "10.0.0.0/8,127.0.0.1"),
                ("MXRELAY_SMTPD_FORBID_BARE_NEWLINE", "false"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.smtp.listen, "127.0.0.1:2600".parse().unwrap());
        assert_eq!(c.message_size_limit, 1048576);
        assert_eq!(c.domains.refresh, std::time::Duration::from_secs(5));
        assert_eq!(c.mynetworks, ["10.0.0.0/8".parse().unwrap(), "127.0.0.1/32".parse().unwrap()]);
        assert!(!c.smtpd_forbid_bare_newline);
    }

    #[test]
    fn unknown_env_key_is_named() {
        let e = Config::load_from(None, &env(&[("MXRELAY_SMTP_LISTN", "x")])).unwrap_err();
        assert_eq!(e[0].key, "MXRELAY_SMTP_LISTN");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e =
            Config::load_from(None, &env(&[("MXRELAY_SMTP_LISTEN", "nowhere"), ("MXRELAY_MYNETWORKS", "10.0.0.0/33")]))
                .unwrap_err();
        let keys: Vec<_> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["mynetworks", "smtp.listen"], "{e:#?}");
        assert!(e[0].problem.contains("\"10.0.0.0/33\" is not an IP address or CIDR"), "{}", e[0]);
        assert!(e[1].problem.contains("nowhere") && e[1].fix.contains("ip:port"), "{}", e[1]);
    }
}
