//! Who may call the service: roles, API tokens (stored only as HMAC-SHA256 under a server key,
//! compared in constant time) and users (argon2id passwords), kept in an auth file outside the lake
//! (created mode 0600), plus browser sessions, CSRF tokens and the failed-login limiter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Environment variable holding the token key (base64, 32+ bytes); else the auth file's `key`.
pub const SECRET_ENV: &str = "THREATLAKE_AUTH_SECRET";

/// Errors reading or changing the auth file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The file cannot be read or written.
    #[error("auth file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A name, role or duration given is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// No such user or token.
    #[error("no {what} named {name:?} in {path}")]
    Unknown {
        /// user or token.
        what: &'static str,
        /// The name.
        name: String,
        /// The file.
        path: String,
    },
}

/// Roles, each including the ones below it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read the API and the dashboard.
    Reader,
    /// Also start jobs, export, push, give mapping feedback.
    Analyst,
    /// Also manage users and tokens.
    Admin,
}

impl Role {
    /// Parse `reader`, `analyst`, `admin`.
    pub fn parse(s: &str) -> Result<Role, AuthError> {
        match s.to_ascii_lowercase().as_str() {
            "reader" => Ok(Role::Reader),
            "analyst" => Ok(Role::Analyst),
            "admin" => Ok(Role::Admin),
            _ => Err(AuthError::Invalid(format!(
                "role {s:?}: use reader, analyst or admin"
            ))),
        }
    }
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Analyst => "analyst",
            Role::Admin => "admin",
        }
    }
}

/// An API token as stored: never the token itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenEntry {
    /// Name (unique).
    pub name: String,
    /// Role it grants.
    pub role: Role,
    /// HMAC-SHA256(key, token), hex.
    pub hash: String,
    /// When created.
    pub created: DateTime<Utc>,
    /// When it stops working, if ever.
    #[serde(default)]
    pub expires: Option<DateTime<Utc>>,
    /// When revoked, if it was (kept so the audit trail can name it).
    #[serde(default)]
    pub revoked: Option<DateTime<Utc>>,
}

/// A user as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserEntry {
    /// Login name (unique).
    pub name: String,
    /// Role.
    pub role: Role,
    /// argon2id PHC string.
    pub password: String,
    /// When created.
    pub created: DateTime<Utc>,
}

/// The auth file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthData {
    /// Token key (base64), made at creation; THREATLAKE_AUTH_SECRET overrides it.
    #[serde(default)]
    pub key: String,
    /// API tokens.
    #[serde(default)]
    pub tokens: Vec<TokenEntry>,
    /// Users.
    #[serde(default)]
    pub users: Vec<UserEntry>,
}

/// The auth file on disk.
pub struct AuthFile {
    path: PathBuf,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// `n` random bytes, base64url.
pub fn random_token(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b64().encode(b)
}

fn valid_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "name {name:?}: use 1-64 letters, digits, '-', '_', '.', '@'"
        )))
    }
}

impl AuthFile {
    /// The file at `path` (read on each use; created on first change).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, message: impl std::fmt::Display) -> AuthError {
        AuthError::File {
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }

    /// Read it (empty when absent). Refuses a file others can read.
    pub fn load(&self) -> Result<AuthData, AuthError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AuthData::default()),
            Err(e) => return Err(self.err(e)),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&self.path)
                .map_err(|e| self.err(e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(self.err(format!(
                    "readable by others (mode {:o}); run `chmod 600 {}`",
                    mode & 0o777,
                    self.path.display()
                )));
            }
        }
        serde_yaml_ng::from_str(&text).map_err(|e| self.err(format!("invalid: {e}")))
    }

    /// Write it atomically, mode 0600, a new key made if it has none.
    pub fn save(&self, data: &mut AuthData) -> Result<(), AuthError> {
        if data.key.is_empty() {
            data.key = random_token(32);
        }
        let text = serde_yaml_ng::to_string(&*data).map_err(|e| self.err(e))?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            std::process::id()
        ));
        {
            use std::io::Write;
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                o.mode(0o600);
            }
            let mut f = o.open(&tmp).map_err(|e| self.err(e))?;
            f.write_all(
                b"# threatlake users and API tokens: keyed hashes only. Keep this file private (mode 0600).\n",
            )
            .and_then(|_| f.write_all(text.as_bytes()))
            .and_then(|_| f.sync_all())
            .map_err(|e| self.err(e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))
    }

    /// Create a token: returns it (shown once) and its entry.
    pub fn create_token(
        &self,
        name: &str,
        role: Role,
        expires: Option<Duration>,
    ) -> Result<(String, TokenEntry), AuthError> {
        valid_name(name)?;
        let mut data = self.load()?;
        if data.tokens.iter().any(|t| t.name == name) {
            return Err(AuthError::Invalid(format!(
                "a token named {name:?} exists; revoke it or choose another name"
            )));
        }
        if data.key.is_empty() {
            data.key = random_token(32);
        }
        let token = format!("tl_{}", random_token(32));
        let now = Utc::now();
        let entry = TokenEntry {
            name: name.to_string(),
            role,
            hash: token_hash(&key_of(&data), &token),
            created: now,
            expires: expires
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| now + d),
            revoked: None,
        };
        data.tokens.push(entry.clone());
        self.save(&mut data)?;
        Ok((token, entry))
    }

    /// Revoke a token by name.
    pub fn revoke_token(&self, name: &str) -> Result<(), AuthError> {
        let mut data = self.load()?;
        let t = data
            .tokens
            .iter_mut()
            .find(|t| t.name == name)
            .ok_or_else(|| AuthError::Unknown {
                what: "token",
                name: name.to_string(),
                path: self.path.display().to_string(),
            })?;
        t.revoked.get_or_insert_with(Utc::now);
        self.save(&mut data)
    }

    /// Add a user (or replace the password and role of an existing one when `replace`).
    pub fn set_user(
        &self,
        name: &str,
        role: Option<Role>,
        password: &str,
        replace: bool,
    ) -> Result<(), AuthError> {
        valid_name(name)?;
        if password.chars().count() < 12 {
            return Err(AuthError::Invalid(
                "the password is shorter than 12 characters; choose a longer one".into(),
            ));
        }
        let hash = hash_password(password)?;
        let mut data = self.load()?;
        match data.users.iter_mut().find(|u| u.name == name) {
            Some(_) if !replace => {
                return Err(AuthError::Invalid(format!(
                    "user {name:?} exists; use `auth user passwd {name}`"
                )))
            }
            Some(u) => {
                u.password = hash;
                if let Some(r) = role {
                    u.role = r;
                }
            }
            None if replace => {
                return Err(AuthError::Unknown {
                    what: "user",
                    name: name.to_string(),
                    path: self.path.display().to_string(),
                })
            }
            None => data.users.push(UserEntry {
                name: name.to_string(),
                role: role.unwrap_or(Role::Reader),
                password: hash,
                created: Utc::now(),
            }),
        }
        self.save(&mut data)
    }

    /// Remove a user.
    pub fn remove_user(&self, name: &str) -> Result<(), AuthError> {
        let mut data = self.load()?;
        let before = data.users.len();
        data.users.retain(|u| u.name != name);
        if data.users.len() == before {
            return Err(AuthError::Unknown {
                what: "user",
                name: name.to_string(),
                path: self.path.display().to_string(),
            });
        }
        self.save(&mut data)
    }
}

/// The token key: THREATLAKE_AUTH_SECRET, else the file's.
pub fn key_of(data: &AuthData) -> Vec<u8> {
    match std::env::var(SECRET_ENV) {
        Ok(k) if !k.trim().is_empty() => k.trim().as_bytes().to_vec(),
        _ => data.key.as_bytes().to_vec(),
    }
}

/// HMAC-SHA256(key, token), hex.
pub fn token_hash(key: &[u8], token: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(token.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Invalid(format!("hashing the password: {e}")))
}

/// Who a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User or token name (`token:NAME` for tokens).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Signed in through a browser session (state changes then need the CSRF token).
    pub session: Option<String>,
}

/// Why a token was refused (all answer 401 alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Unknown.
    Unknown,
    /// Revoked.
    Revoked,
    /// Expired.
    Expired,
}

/// The auth state a server checks against (reloaded when the file changes).
pub struct Verifier {
    file: AuthFile,
    cache: Mutex<Option<(std::time::SystemTime, AuthData)>>,
    dummy_hash: String,
}

impl Verifier {
    /// Over `path`.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self, AuthError> {
        let v = Self {
            file: AuthFile::new(path),
            cache: Mutex::new(None),
            dummy_hash: hash_password("threatlake-timing-equaliser")?,
        };
        v.data()?;
        Ok(v)
    }

    /// The file's current content (re-read when its modification time changes, so `auth token
    /// revoke` takes effect without a restart).
    pub fn data(&self) -> Result<AuthData, AuthError> {
        let mtime = std::fs::metadata(self.file.path())
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, d)) = c.as_ref() {
            if *t == mtime {
                return Ok(d.clone());
            }
        }
        let d = self.file.load()?;
        *c = Some((mtime, d.clone()));
        Ok(d)
    }

    /// Check a bearer token. Every stored hash is compared (constant time each), so the time taken
    /// does not say which one matched.
    pub fn token(&self, token: &str) -> Result<Principal, TokenRefusal> {
        let data = self.data().map_err(|_| TokenRefusal::Unknown)?;
        if data.key.is_empty() && std::env::var(SECRET_ENV).is_err() {
            return Err(TokenRefusal::Unknown);
        }
        let h = token_hash(&key_of(&data), token);
        let mut found: Option<&TokenEntry> = None;
        for t in &data.tokens {
            if bool::from(t.hash.as_bytes().ct_eq(h.as_bytes())) {
                found = Some(t);
            }
        }
        let t = found.ok_or(TokenRefusal::Unknown)?;
        if t.revoked.is_some() {
            return Err(TokenRefusal::Revoked);
        }
        if t.expires.is_some_and(|e| e <= Utc::now()) {
            return Err(TokenRefusal::Expired);
        }
        Ok(Principal {
            name: format!("token:{}", t.name),
            role: t.role,
            session: None,
        })
    }

    /// Check a user's password. An unknown user costs the same argon2 work as a wrong password.
    pub fn password(&self, user: &str, password: &str) -> Option<Role> {
        let data = self.data().ok()?;
        let u = data.users.iter().find(|u| u.name == user);
        let stored = u.map_or(self.dummy_hash.as_str(), |u| u.password.as_str());
        let ok = PasswordHash::new(stored)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false);
        match (ok, u) {
            (true, Some(u)) => Some(u.role),
            _ => None,
        }
    }
}

/// A browser session.
#[derive(Debug, Clone)]
pub struct Session {
    /// User.
    pub user: String,
    /// Role at login.
    pub role: Role,
    /// CSRF token for state-changing requests.
    pub csrf: String,
    created: Instant,
    seen: Instant,
}

/// Sessions in memory (a restart signs everyone out).
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    idle: Duration,
    max: Duration,
}

impl Sessions {
    /// With idle and absolute lifetimes.
    pub fn new(idle: Duration, max: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            idle,
            max,
        }
    }

    /// A new session (fresh id: ids are never reused across logins). Returns its id.
    pub fn create(&self, user: &str, role: Role) -> (String, Session) {
        let id = random_token(32);
        let now = Instant::now();
        let s = Session {
            user: user.to_string(),
            role,
            csrf: random_token(32),
            created: now,
            seen: now,
        };
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, s| {
            now.duration_since(s.seen) < self.idle && now.duration_since(s.created) < self.max
        });
        m.insert(id.clone(), s.clone());
        (id, s)
    }

    /// The live session `id`, touched.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let s = m.get_mut(id)?;
        if now.duration_since(s.seen) >= self.idle || now.duration_since(s.created) >= self.max {
            m.remove(id);
            return None;
        }
        s.seen = now;
        Some(s.clone())
    }

    /// Whether `token` is the live session `id`'s CSRF token (compared in constant time).
    pub fn csrf_matches(&self, id: &str, token: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.get(id)
            .is_some_and(|s| bool::from(s.csrf.as_bytes().ct_eq(token)))
    }

    /// End a session.
    pub fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Failed logins per user name and per client address in a sliding window.
pub struct LoginLimiter {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
    max: u32,
    window: Duration,
}

impl LoginLimiter {
    /// `max` failures per key within `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
            max: max.max(1),
            window,
        }
    }

    fn keys(user: &str, ip: IpAddr) -> [String; 2] {
        [format!("user:{user}"), format!("ip:{ip}")]
    }

    /// Whether this user or address has used up its failures.
    pub fn blocked(&self, user: &str, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        Self::keys(user, ip).iter().any(|k| {
            let v = f.entry(k.clone()).or_default();
            v.retain(|t| now.duration_since(*t) < self.window);
            v.len() as u32 >= self.max
        })
    }

    /// Count a failure.
    pub fn fail(&self, user: &str, ip: IpAddr) {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Sprayed user names must not grow the map without bound: drop what the window forgot.
        if f.len() > 10_000 {
            f.retain(|_, v| {
                v.retain(|t| now.duration_since(*t) < self.window);
                !v.is_empty()
            });
        }
        for k in Self::keys(user, ip) {
            f.entry(k).or_default().push(now);
        }
    }

    /// A success clears the user's failures (not the address's).
    pub fn succeed(&self, user: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&format!("user:{user}"));
    }
}

/// Parse `90d`, `12h`, `30m` for `--expires`.
pub fn parse_expiry(s: &str) -> Result<Duration, AuthError> {
    humantime::parse_duration(s)
        .map_err(|e| AuthError::Invalid(format!("--expires {s:?}: {e}; use e.g. 90d, 12h, 30m")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_by_keyed_hash_and_honour_revocation_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let file = AuthFile::new(dir.path().join("auth.yaml"));
        let (token, entry) = file.create_token("ci", Role::Analyst, None).unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert!(!text.contains(&token), "the token itself is stored");
        assert!(text.contains(&entry.hash));
        let v = Verifier::new(file.path()).unwrap();
        assert_eq!(v.token(&token).unwrap().role, Role::Analyst);
        assert_eq!(v.token("tl_wrong"), Err(TokenRefusal::Unknown));
        let (short, _) = file
            .create_token("short", Role::Reader, Some(Duration::from_millis(1)))
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(v.token(&short), Err(TokenRefusal::Expired));
        file.revoke_token("ci").unwrap();
        assert_eq!(v.token(&token), Err(TokenRefusal::Revoked));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn limiter_blocks_after_max_failures_per_user_and_per_address() {
        let l = LoginLimiter::new(2, Duration::from_secs(60));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(!l.blocked("alice", a));
        l.fail("alice", a);
        l.fail("alice", a);
        assert!(l.blocked("alice", b), "per user");
        assert!(l.blocked("bob", a), "per address");
        assert!(!l.blocked("bob", b));
    }
}
