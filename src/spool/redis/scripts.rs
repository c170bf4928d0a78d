//! The queue's Lua scripts (`lua/*.lua`), each with the shared prelude
//! (fencing, live-entry bookkeeping, destination index) prepended. Every
//! step that changes a message is one of these: atomic, on one shard's
//! keys (one hash slot).

use std::sync::LazyLock;

use redis::Script;

macro_rules! script {
    ($name:ident, $file:literal) => {
        pub static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(concat!(include_str!("lua/prelude.lua"), include_str!($file))));
    };
}

script!(COMMIT, "lua/commit.lua");
script!(LANDED, "lua/landed.lua");
script!(PUBLISH, "lua/publish.lua");
script!(WITHDRAW, "lua/withdraw.lua");
script!(RENEW, "lua/renew.lua");
script!(TAKEOVER, "lua/takeover.lua");
script!(RECLAIM, "lua/reclaim.lua");
script!(COMPLETE, "lua/complete.lua");
script!(DEFER, "lua/defer.lua");
script!(HAND_BACK, "lua/hand_back.lua");
script!(SKIP, "lua/skip.lua");
script!(QUARANTINE, "lua/quarantine.lua");
script!(SCHEDULE, "lua/schedule.lua");
script!(RELEASE, "lua/release.lua");
script!(ADMIN, "lua/admin.lua");
script!(MAINTAIN, "lua/maintain.lua");
// Not a message step: the shared verification cache's lookup (the prelude is unused there).
script!(RECALL_OR_CLAIM, "lua/recall_or_claim.lua");
