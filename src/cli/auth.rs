//! `threatlake auth token|user …`: API tokens and users of the service, in `server.auth_file`.

use std::io::{BufRead, IsTerminal};

use anyhow::{bail, Result};
use threatlake::server::auth::{parse_expiry, AuthFile, Role};
use threatlake::Settings;

use crate::{AuthCommand, TokenCommand, UserCommand};

fn read_password() -> Result<String> {
    if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("password: ")?;
        let b = rpassword::prompt_password("again: ")?;
        if a != b {
            bail!("the two passwords differ; nothing was changed");
        }
        Ok(a)
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let p = line.trim_end_matches(['\n', '\r']).to_string();
        if p.is_empty() {
            bail!("no password on stdin; pipe it in (`printf '%s\\n' \"$PW\" | threatlake auth user add …`) or run in a terminal");
        }
        Ok(p)
    }
}

/// Dispatch `auth`.
pub fn run(settings: &Settings, c: AuthCommand) -> Result<()> {
    let file = AuthFile::new(&settings.server.auth_file);
    match c {
        AuthCommand::Token(TokenCommand::Create {
            name,
            role,
            expires,
        }) => {
            let role = Role::parse(&role)?;
            let expires = expires.as_deref().map(parse_expiry).transpose()?;
            let (token, entry) = file.create_token(&name, role, expires)?;
            println!(
                "token {name} ({}) created in {}{}; it is shown once, below:",
                role.as_str(),
                file.path().display(),
                entry
                    .expires
                    .map(|e| format!(", expires {}", e.format("%Y-%m-%d %H:%M UTC")))
                    .unwrap_or_default()
            );
            println!("{token}");
        }
        AuthCommand::Token(TokenCommand::List) => {
            let data = file.load()?;
            if data.tokens.is_empty() {
                println!("no tokens in {}", file.path().display());
            }
            for t in data.tokens {
                let state = match (t.revoked, t.expires) {
                    (Some(r), _) => format!("revoked {}", r.format("%Y-%m-%d")),
                    (None, Some(e)) if e <= chrono::Utc::now() => {
                        format!("expired {}", e.format("%Y-%m-%d"))
                    }
                    (None, Some(e)) => format!("expires {}", e.format("%Y-%m-%d")),
                    (None, None) => "no expiry".into(),
                };
                println!(
                    "{:<24} {:<8} created {}  {state}",
                    t.name,
                    t.role.as_str(),
                    t.created.format("%Y-%m-%d")
                );
            }
        }
        AuthCommand::Token(TokenCommand::Revoke { name }) => {
            file.revoke_token(&name)?;
            println!("token {name} revoked");
        }
        AuthCommand::User(UserCommand::Add { name, role }) => {
            let role = Role::parse(&role)?;
            let pw = read_password()?;
            file.set_user(&name, Some(role), &pw, false)?;
            println!("user {name} ({}) added", role.as_str());
        }
        AuthCommand::User(UserCommand::Passwd { name }) => {
            let pw = read_password()?;
            file.set_user(&name, None, &pw, true)?;
            println!("password of {name} changed (signed-in sessions stay until they expire or the server restarts)");
        }
        AuthCommand::User(UserCommand::List) => {
            let data = file.load()?;
            if data.users.is_empty() {
                println!("no users in {}", file.path().display());
            }
            for u in data.users {
                println!(
                    "{:<24} {:<8} created {}",
                    u.name,
                    u.role.as_str(),
                    u.created.format("%Y-%m-%d")
                );
            }
        }
        AuthCommand::User(UserCommand::Remove { name }) => {
            file.remove_user(&name)?;
            println!("user {name} removed");
        }
    }
    Ok(())
}
