//! Notifications: robot webhooks carry their own credentials; chat and user targets go through
//! the app.

use crate::env::Env;
use crate::error::{Error, Result};
use crate::model::{ImApp, Notification, Receipt, Target, UserRef};
use crate::platform;

const MAX_TITLE_CHARS: usize = 200;
/// Platforms cap message bodies around 20–30 KB; fail clearly before they do.
const MAX_MARKDOWN_BYTES: usize = 20_000;

pub fn notify(env: &(impl Env + ?Sized), app: Option<&ImApp>, n: &Notification) -> Result<Receipt> {
    if n.title.trim().is_empty() || n.title.chars().count() > MAX_TITLE_CHARS {
        return Err(Error::input(format!(
            "title must be 1..={MAX_TITLE_CHARS} characters"
        )));
    }
    if n.markdown.len() > MAX_MARKDOWN_BYTES {
        return Err(Error::input(format!(
            "markdown exceeds {MAX_MARKDOWN_BYTES} bytes"
        )));
    }
    let users = match &n.target {
        Target::Users(users) => &users[..],
        _ => &[],
    };
    users.iter().chain(&n.mentions).try_for_each(check_person)?;
    match &n.target {
        Target::Webhook(hook) => {
            check_webhook_url(&hook.url)?;
            // The app only looks up mentioned users on the webhook's platform; another
            // platform's app would send its credentials to the wrong platform's servers, so
            // it is not used (a lookup then fails as without an app).
            let app =
                app.filter(|a| platform::family(a.platform) == platform::family(hook.platform));
            platform::send_webhook(env, app, hook, n)
        }
        Target::Chat(_) | Target::Users(_) => {
            let app = app.ok_or_else(|| Error::input("chat and user targets need an app"))?;
            platform::send_message(env, app, n)
        }
    }
}

/// Ids and emails end up in separated lists (WeCom's `touser` "a|b", DingTalk's "a,b") and in
/// mention markup (Feishu's `<at id=…>`): one holding a separator or markup, or naming
/// everyone (`@all` is WeCom's whole company), would reach people the caller did not name.
fn check_person(u: &UserRef) -> Result<()> {
    let (UserRef::Id(s) | UserRef::Email(s)) = u else {
        return Ok(());
    };
    let s = s.trim();
    // Only what separates or ends something: `o'brien@corp.com` is a fine address.
    let odd = s.bytes().any(|b| b <= b' ' || b"|,<>".contains(&b));
    if s.is_empty() || odd || s.trim_start_matches('@').eq_ignore_ascii_case("all") {
        return Err(Error::input(
            "a user id or email holds a space, separator or markup, or is @all",
        ));
    }
    Ok(())
}

/// The webhook URL is part of the notification, not of an app's settings: one the host could
/// not send to is `invalid-input` here, before the request is built (where a URL that does not
/// parse is the app's `invalid-config`). The platforms' robot URLs are plain ASCII; anything
/// else must come percent-encoded.
fn check_webhook_url(url: &str) -> Result<()> {
    if crate::http::split_url(url).is_none() {
        return Err(Error::input("webhook url must be http(s) with a host"));
    }
    if !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::input(
            "webhook url must be printable ASCII without spaces (percent-encode the rest)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::fake::FakeEnv;
    use crate::model::{Level, Platform, RobotWebhook, UserRef};

    fn to_hook(platform: Platform) -> Notification {
        Notification {
            target: Target::Webhook(RobotWebhook {
                platform,
                url: "https://hooks.example/robot".into(),
                secret: None,
            }),
            title: "deploy failed".into(),
            markdown: "wf-42".into(),
            level: Level::Failure,
            link: None,
            mentions: vec![UserRef::Mobile("13800000000".into())],
            mention_all: false,
        }
    }

    /// A webhook URL the request could not be built from is the notification's fault
    /// (`invalid-input`), found before anything is sent. A URL without a host, or with a
    /// space in its query, used to come back as `invalid-config` from building the request,
    /// sending the operator to app settings that were fine.
    #[test]
    fn a_malformed_webhook_url_is_invalid_input() {
        for url in [
            "ftp://hooks.example/robot",
            "https://",
            "https:///robot",
            "http://?access_token=x",
            "https://hooks.example/robot?key=a b",
            "https://hooks.example/robot\n",
            "https://hooks.example/röbot",
        ] {
            let env = FakeEnv::offline();
            let mut n = to_hook(Platform::Wecom);
            if let Target::Webhook(hook) = &mut n.target {
                hook.url = url.into();
            }
            let r = notify(&env, None, &n);
            assert!(matches!(r, Err(Error::InvalidInput(_))), "{url:?}: {r:?}");
            assert!(env.sent.borrow().is_empty(), "{url:?}");
        }
        // A well-formed one goes out (and fails offline, as a transport error).
        let env = FakeEnv::offline();
        let r = notify(&env, None, &to_hook(Platform::Wecom));
        assert!(matches!(r, Err(Error::Transport(_))), "{r:?}");
    }

    /// A user id or email that would reach people the caller did not name (everyone, by
    /// `@all`; more people, through a list separator; a mention of everyone, through
    /// markup) is refused before anything is sent. Before, WeCom's `touser` took "a|@all",
    /// the whole company, and a Feishu mention "all" pinged the whole chat.
    #[test]
    fn a_user_that_names_more_people_is_invalid_input() {
        let app = crate::platform::wecom::tests::app();
        for bad in [
            "@all",
            "ALL",
            "a|@all",
            "a,b",
            "x></at><at id=all",
            "a b",
            " ",
            "a\tb",
        ] {
            for target in [true, false] {
                let env = FakeEnv::offline();
                let mut n = to_hook(Platform::Feishu);
                n.mentions = Vec::new();
                let user = UserRef::Id(bad.into());
                if target {
                    n.target = Target::Users(vec![UserRef::Id("u1".into()), user]);
                } else {
                    n.mentions = vec![UserRef::Email(bad.into())];
                }
                let r = notify(&env, Some(&app), &n);
                assert!(matches!(r, Err(Error::InvalidInput(_))), "{bad:?}: {r:?}");
                assert!(env.sent.borrow().is_empty(), "{bad:?}");
            }
        }
        // Ordinary ids and emails go out (and fail offline, as a transport error).
        let env = FakeEnv::offline();
        let mut n = to_hook(Platform::Feishu);
        n.target = Target::Users(vec![UserRef::Id("zhang.san-1@corp_x".into())]);
        n.mentions = vec![UserRef::Email("o'brien+ci@example.com".into())];
        assert!(matches!(
            notify(&env, Some(&app), &n),
            Err(Error::Transport(_))
        ));
    }

    /// The app looks up mentioned users; another platform's app would send its secret to the
    /// webhook platform's token endpoint, so it is not used: a lookup fails as without an
    /// app, and a message that needs none goes out.
    #[test]
    fn a_webhook_never_uses_another_platforms_app() {
        let apps = [
            crate::platform::feishu::tests::app(),
            crate::platform::dingtalk::tests::app(),
            crate::platform::wecom::tests::app(),
        ];
        for app in &apps {
            for hook in [Platform::Feishu, Platform::Dingtalk, Platform::Wecom] {
                if crate::platform::family(app.platform) == hook {
                    continue;
                }
                let env = FakeEnv::offline();
                // Feishu looks mobiles up, WeCom emails; DingTalk mentions mobiles as they are.
                let mut n = to_hook(hook);
                n.mentions = vec![UserRef::Email("a@example.com".into())];
                if hook == Platform::Feishu {
                    n.mentions = vec![UserRef::Mobile("13800000000".into())];
                }
                let r = notify(&env, Some(app), &n);
                let sent = env.sent.borrow();
                assert!(
                    sent.iter()
                        .all(|r| r.url.starts_with("https://hooks.example/")),
                    "{:?} app, {hook:?} hook: {:?}",
                    app.platform,
                    sent.iter().map(|r| &r.url).collect::<Vec<_>>()
                );
                if hook != Platform::Dingtalk {
                    assert!(
                        matches!(r, Err(Error::InvalidInput(ref m)) if m.contains("needs")),
                        "{r:?}"
                    );
                }
            }
        }
        // A Lark app serves a Feishu robot: the lookup goes out (and fails offline).
        let mut lark = crate::platform::feishu::tests::app();
        lark.platform = Platform::Lark;
        let env = FakeEnv::offline();
        assert!(notify(&env, Some(&lark), &to_hook(Platform::Feishu)).is_err());
        assert!(!env.sent.borrow().is_empty());
    }
}
