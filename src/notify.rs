//! Notifications: robot webhooks carry their own credentials; chat and user targets go through
//! the app.

use crate::env::Env;
use crate::error::{Error, Result};
use crate::model::{ImApp, Notification, Receipt, Target};
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

/// The webhook URL is part of the notification, not of an app's settings: one the host could
/// not send to is `invalid-input` here, before the request is built (where a URL that does not
/// parse is the app's `invalid-config`). The platforms' robot URLs are plain ASCII; anything
/// else must come percent-encoded.
fn check_webhook_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| Error::input("webhook url must be http(s)"))?;
    if rest.is_empty() || rest.starts_with(['/', '?', '#']) {
        return Err(Error::input("webhook url has no host"));
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
