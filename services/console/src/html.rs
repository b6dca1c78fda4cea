//! HTML written out by hand: escaping, and the page every view sits in.

use std::fmt::Write as _;

use crate::session::{Role, Session};

/// Text made safe for an HTML element or a quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string component.
pub fn q(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Something said at the top of a page.
pub enum Notice {
    /// etcd did not answer: the page shows no stale data.
    EtcdDown(String),
    /// A change was refused: why, and that nothing was written.
    Error(String),
    /// A change was made.
    Said(String),
}

/// The page: header with navigation and the session, notices, then `body`.
pub fn page(title: &str, here: &str, session: Option<&Session>, notices: &[Notice], body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{} · meshkit console</title><link rel=\"stylesheet\" href=\"/assets/console.css\"></head><body>",
        esc(title)
    );
    if let Some(s) = session {
        out.push_str("<header><span class=\"brand\">meshkit console</span><nav>");
        for (href, name) in [
            ("/services", "Services"),
            ("/governance", "Governance"),
            ("/events", "Events"),
            ("/jobs", "Jobs"),
            ("/config", "Config center"),
            ("/audit", "Audit log"),
        ] {
            let class = if here == href { " class=\"here\"" } else { "" };
            let _ = write!(out, "<a href=\"{href}\"{class}>{name}</a>");
        }
        let _ = write!(
            out,
            "</nav><span class=\"who\"><span id=\"who\">{} · {}</span><form class=\"inline\" method=\"post\" action=\"/logout\">{}\
             <button class=\"quiet\" id=\"sign-out\">Sign out</button></form></span></header>",
            esc(&s.user),
            s.role.name(),
            csrf_field(s)
        );
    }
    out.push_str("<main>");
    for n in notices {
        let (class, text) = match n {
            Notice::EtcdDown(t) => ("down", t),
            Notice::Error(t) => ("error", t),
            Notice::Said(t) => ("said", t),
        };
        let _ = write!(out, "<div class=\"banner {class}\" role=\"alert\">{}</div>", esc(text));
    }
    let _ = write!(out, "<h1>{}</h1>{body}</main></body></html>", esc(title));
    out
}

/// The hidden field every change's form carries.
pub fn csrf_field(s: &Session) -> String {
    format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(&s.csrf))
}

/// Whether the session may change things (the forms are left out otherwise).
pub fn may_change(s: &Session) -> bool {
    s.role == Role::Admin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(q("a b&c/d"), "a+b%26c%2Fd");
    }
}
