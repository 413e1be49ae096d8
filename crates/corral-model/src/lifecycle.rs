/// Where a machine is in its life: what its next network boot should do.
///
/// `new → discovered → install → installed → local`. A machine in `install` is handed its
/// installer; the installer's done-callback moves it to `installed`, and from then on every
/// boot path answers "boot from the local disk", so a machine never loops into a reinstall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleState {
    /// Declared in the site directory, never seen on the network.
    New,
    /// Seen on the network but not declared (enrolled automatically), or not yet scheduled.
    Discovered,
    /// The next boot installs the machine's profile.
    Install,
    /// The installer reported success; the next boot goes to the local disk.
    Installed,
    /// In service, booting from its disk.
    Local,
}

impl LifecycleState {
    /// Every state, in lifecycle order.
    pub const ALL: [LifecycleState; 5] = [
        LifecycleState::New,
        LifecycleState::Discovered,
        LifecycleState::Install,
        LifecycleState::Installed,
        LifecycleState::Local,
    ];

    /// The lowercase name used in files, the store and the CLI.
    pub fn as_str(&self) -> &'static str {
        match self {
            LifecycleState::New => "new",
            LifecycleState::Discovered => "discovered",
            LifecycleState::Install => "install",
            LifecycleState::Installed => "installed",
            LifecycleState::Local => "local",
        }
    }
}

crate::named_enum!(LifecycleState, "lifecycle state");
