//! The plugin's exports as values: which one to call, with what, and what came back.

use crate::bindings::Plugin;
use crate::bindings::types::{
    Approval, ApprovalRequest, CallbackOutcome, Error, HttpRequest, ImApp, Notification, Receipt,
};
use crate::sandbox::CallState;
use anyhow::{Result, bail};
use std::fmt;
use std::str::FromStr;
use wasmtime::Store;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    StartApproval,
    GetApproval,
    CancelApproval,
    Notify,
    HandleCallback,
    HandleEvent,
}

impl Export {
    pub const ALL: [Export; 6] = [
        Export::StartApproval,
        Export::GetApproval,
        Export::CancelApproval,
        Export::Notify,
        Export::HandleCallback,
        Export::HandleEvent,
    ];

    /// The WIT name.
    pub fn name(self) -> &'static str {
        match self {
            Export::StartApproval => "start-approval",
            Export::GetApproval => "get-approval",
            Export::CancelApproval => "cancel-approval",
            Export::Notify => "notify",
            Export::HandleCallback => "handle-callback",
            Export::HandleEvent => "handle-event",
        }
    }
}

impl fmt::Display for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Export {
    type Err = anyhow::Error;

    /// Accepts the WIT name or its snake_case spelling.
    fn from_str(s: &str) -> Result<Export> {
        let wanted = s.replace('_', "-");
        match Export::ALL.into_iter().find(|e| e.name() == wanted) {
            Some(e) => Ok(e),
            None => bail!(
                "unknown export `{s}` (expected one of: start-approval, get-approval, \
                 cancel-approval, notify, handle-callback, handle-event)"
            ),
        }
    }
}

/// One export call with its arguments.
///
pub enum Call {
    StartApproval {
        app: ImApp,
        request: ApprovalRequest,
    },
    GetApproval {
        app: ImApp,
        instance_id: String,
        refresh: bool,
    },
    CancelApproval {
        app: ImApp,
        instance_id: String,
        reason: Option<String>,
    },
    Notify {
        app: Option<ImApp>,
        notification: Notification,
    },
    HandleCallback {
        app: ImApp,
        request: HttpRequest,
    },
    /// An event received over a persistent connection (plaintext event JSON).
    HandleEvent {
        app: ImApp,
        event: Vec<u8>,
    },
}

/// Shows only which export: the arguments may hold secrets.
impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Call({})", self.export())
    }
}

impl Call {
    pub fn export(&self) -> Export {
        match self {
            Call::StartApproval { .. } => Export::StartApproval,
            Call::GetApproval { .. } => Export::GetApproval,
            Call::CancelApproval { .. } => Export::CancelApproval,
            Call::Notify { .. } => Export::Notify,
            Call::HandleCallback { .. } => Export::HandleCallback,
            Call::HandleEvent { .. } => Export::HandleEvent,
        }
    }

    pub fn app(&self) -> Option<&ImApp> {
        match self {
            Call::StartApproval { app, .. }
            | Call::GetApproval { app, .. }
            | Call::CancelApproval { app, .. }
            | Call::HandleCallback { app, .. }
            | Call::HandleEvent { app, .. } => Some(app),
            Call::Notify { app, .. } => app.as_ref(),
        }
    }

    /// Calls the export on an instantiated plugin.
    pub(crate) async fn invoke(
        &self,
        plugin: &Plugin,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<Reply> {
        Ok(match self {
            Call::StartApproval { app, request } => {
                Reply::Approval(plugin.call_start_approval(store, app, request).await?)
            }
            Call::GetApproval {
                app,
                instance_id,
                refresh,
            } => Reply::Approval(
                plugin
                    .call_get_approval(store, app, instance_id, *refresh)
                    .await?,
            ),
            Call::CancelApproval {
                app,
                instance_id,
                reason,
            } => Reply::Approval(
                plugin
                    .call_cancel_approval(store, app, instance_id, reason.as_deref())
                    .await?,
            ),
            Call::Notify { app, notification } => Reply::Receipt(
                plugin
                    .call_notify(store, app.as_ref(), notification)
                    .await?,
            ),
            Call::HandleCallback { app, request } => {
                Reply::Callback(plugin.call_handle_callback(store, app, request).await?)
            }
            Call::HandleEvent { app, event } => {
                Reply::Event(plugin.call_handle_event(store, app, event).await?)
            }
        })
    }
}

/// What an export returned: the plugin's own `result`.
#[derive(Debug)]
pub enum Reply {
    Approval(Result<Approval, Error>),
    Receipt(Result<Receipt, Error>),
    Callback(Result<CallbackOutcome, Error>),
    /// `handle-event`: the approvals the event changed.
    Event(Result<Vec<Approval>, Error>),
}

impl Reply {
    /// The plugin's error, if it returned one.
    pub fn error(&self) -> Option<&Error> {
        match self {
            Reply::Approval(Err(e))
            | Reply::Receipt(Err(e))
            | Reply::Callback(Err(e))
            | Reply::Event(Err(e)) => Some(e),
            _ => None,
        }
    }
}
