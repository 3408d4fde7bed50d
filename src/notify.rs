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
            if !(hook.url.starts_with("https://") || hook.url.starts_with("http://")) {
                return Err(Error::input("webhook url must be http(s)"));
            }
            platform::send_webhook(env, app, hook, n)
        }
        Target::Chat(_) | Target::Users(_) => {
            let app = app.ok_or_else(|| Error::input("chat and user targets need an app"))?;
            platform::send_message(env, app, n)
        }
    }
}
