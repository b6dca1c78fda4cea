//! Sessions: who signed in, as what, until when, and the token every change
//! they post must carry (CSRF).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// What a signed-in user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every page, no change.
    Viewer,
    /// Every page and every change.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "read-only",
            Role::Admin => "admin",
        }
    }
}

/// One signed-in user.
#[derive(Debug)]
pub struct Session {
    pub user: String,
    pub role: Role,
    /// The token each change must carry in its form.
    pub csrf: String,
    pub expires: Instant,
}

impl Session {
    /// How changes made in this session are recorded: `ann (console)`.
    pub fn operator(&self) -> String {
        format!("{} (console)", self.user)
    }
}

/// The sessions of one console process, in memory: a restart signs everyone out.
pub struct Sessions {
    ttl: Duration,
    by_id: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, by_id: Mutex::new(HashMap::new()) }
    }

    /// A new session and its id (the cookie's value), for the console's
    /// session time or `until` (a token's expiry), whichever ends first.
    pub fn create(&self, user: &str, role: Role, until: Option<Duration>) -> (String, Arc<Session>) {
        let id = random_token();
        let lasts = until.map_or(self.ttl, |u| u.min(self.ttl));
        let session =
            Arc::new(Session { user: user.to_owned(), role, csrf: random_token(), expires: Instant::now() + lasts });
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session with this id; an expired one is forgotten.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// 32 random bytes as hex: a session id or a CSRF token.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares secrets in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_ids_do_not_repeat() {
        let sessions = Sessions::new(Duration::from_millis(30));
        let (id, s) = sessions.create("ann", Role::Admin, None);
        assert_eq!(sessions.get(&id).map(|s| s.user.clone()).as_deref(), Some("ann"));
        assert_ne!(id, s.csrf);
        assert_eq!(id.len(), 64);
        assert!(sessions.get("forged").is_none());
        std::thread::sleep(Duration::from_millis(40));
        assert!(sessions.get(&id).is_none(), "expired");
        let (other, _) = sessions.create("bob", Role::Viewer, None);
        let (short, _) = sessions.create("jwt", Role::Viewer, Some(Duration::ZERO));
        assert!(sessions.get(&short).is_none(), "ends with its token");
        sessions.remove(&other);
        assert!(sessions.get(&other).is_none(), "signed out");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
