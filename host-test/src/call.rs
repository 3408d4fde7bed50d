//! The plugin's exports as values: which one to call, with what, and what came back.

use crate::bindings::types::{
    Approval, ApprovalRequest, CallbackOutcome, Error, HttpRequest, ImApp, Notification, Receipt,
};
use crate::sandbox::CallState;
use anyhow::{Context as _, Result, bail};
use std::fmt;
use std::str::FromStr;
use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, ComponentNamedList, InstancePre, Lift, Lower};

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

    /// Calls the export on a fresh instance of `plugin` in `store`.
    pub async fn invoke(
        &self,
        plugin: &PluginPre,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<Reply> {
        let instance = plugin.instantiate(&mut *store).await?;
        let index = &plugin.exports[self.export() as usize];
        let f = Callee {
            store,
            instance,
            index,
        };
        Ok(match self {
            Call::StartApproval { app, request } => Reply::Approval(f.call((app, request)).await?),
            Call::GetApproval {
                app,
                instance_id,
                refresh,
            } => Reply::Approval(f.call((app, instance_id.as_str(), *refresh)).await?),
            Call::CancelApproval {
                app,
                instance_id,
                reason,
            } => Reply::Approval(
                f.call((app, instance_id.as_str(), reason.as_deref()))
                    .await?,
            ),
            Call::Notify { app, notification } => {
                Reply::Receipt(f.call((app.as_ref(), notification)).await?)
            }
            Call::HandleCallback { app, request } => Reply::Callback(f.call((app, request)).await?),
            Call::HandleEvent { app, event } => {
                Reply::Event(f.call((app, event.as_slice())).await?)
            }
        })
    }
}

/// A loaded plugin, ready to be instantiated once per call.
///
/// Used instead of the generated `bindings::PluginPre::instantiate_async`, which type-checks
/// all six exports again on every new instance although a call uses one: that was over a
/// tenth of the per-call overhead (issue 7). The generated `PluginPre::new` already checks
/// every export's type once, at load; each call still checks the one it calls (about 0.5 µs),
/// because that check is what ties the Rust types in [`Call::invoke`] to the component
/// without `unsafe`.
#[derive(Clone)]
pub struct PluginPre {
    pre: InstancePre<CallState>,
    /// By `Export as usize`.
    exports: Vec<ComponentExportIndex>,
}

impl PluginPre {
    /// Fails if the component does not export the `imbridge:plugin` world's functions.
    pub fn new(pre: InstancePre<CallState>) -> Result<PluginPre> {
        // The generated check that every export exists with the world's type; its indices
        // are private, so they are looked up again below.
        crate::bindings::PluginPre::new(pre.clone()).map_err(anyhow::Error::from)?;
        let component = pre.component();
        let exports = Export::ALL
            .into_iter()
            .map(|e| {
                component
                    .get_export_index(None, e.name())
                    .with_context(|| format!("the component does not export `{e}`"))
            })
            .collect::<Result<_>>()?;
        Ok(PluginPre { pre, exports })
    }

    /// A new instance in `store`, without looking at its exports.
    pub async fn instantiate(
        &self,
        store: &mut Store<CallState>,
    ) -> wasmtime::Result<wasmtime::component::Instance> {
        self.pre.instantiate_async(store).await
    }

    /// The generated bindings over the same component, for callers that keep an instance
    /// for many calls (benchmarks; the host never does).
    pub fn bindings(&self) -> Result<crate::bindings::PluginPre<CallState>> {
        crate::bindings::PluginPre::new(self.pre.clone()).map_err(anyhow::Error::from)
    }
}

/// One export of one fresh instance.
struct Callee<'a> {
    store: &'a mut Store<CallState>,
    instance: wasmtime::component::Instance,
    index: &'a ComponentExportIndex,
}

impl Callee<'_> {
    async fn call<P, R>(self, params: P) -> wasmtime::Result<R>
    where
        P: ComponentNamedList + Lower + Send + Sync,
        R: Lift + Send + Sync + 'static,
        (R,): ComponentNamedList + Lift,
    {
        let f = self
            .instance
            .get_typed_func::<P, (R,)>(&mut *self.store, self.index)?;
        Ok(f.call_async(&mut *self.store, params).await?.0)
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
