//! The Debian package's maintainer scripts, run for real by dpkg: install, upgrade,
//! remove, purge. dpkg works in a throwaway root — an overlay over this machine's `/` in
//! a mount namespace of the test's own thread — so the machine's package database, users
//! and units are never touched, and everything disappears with the thread. systemd does
//! not run there: `systemctl` is a small script that records what it is asked and keeps
//! the unit's "active" state in a file, which is what the scripts' decisions depend on.

use crate::support::*;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Records each call. Calls on files (`--root=`, as deb-systemd-helper's `preset` on first
/// installation) go to the real systemctl, which works without a running systemd; of the
/// rest, `is-enabled` answers from the unit's links and `is-active` from the state that
/// start/restart/stop leave.
const SYSTEMCTL: &str = r#"#!/bin/sh
echo "systemctl $*" >> /var/log/systemctl.calls
case " $* " in *" --root="*) exec /usr/bin/systemctl "$@" ;; esac
last=""; for a in "$@"; do last="$a"; done
case " $* " in
  *" is-enabled "*)
    if [ -e /etc/systemd/system/multi-user.target.wants/$last ]; then echo enabled; else echo disabled; exit 1; fi ;;
  *" is-active "*) [ -e /run/active.$last ] ;;
  *" start "*|*" restart "*) touch /run/active.$last ;;
  *" stop "*) rm -f /run/active.$last ;;
esac
exit 0
"#;

fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str) {
    let c = |s: &str| CString::new(s).unwrap();
    let shown = format!("mount {fstype} on {}", target.display());
    let (source, target, fstype, data) =
        (c(source), c(target.to_str().unwrap()), c(fstype), c(data));
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            if data.as_bytes().is_empty() {
                std::ptr::null()
            } else {
                data.as_ptr().cast()
            },
        )
    };
    assert_eq!(r, 0, "{shown}: {}", std::io::Error::last_os_error());
}

/// A root where dpkg may do anything.
struct Throwaway {
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Throwaway {
    fn new() -> Throwaway {
        // SAFETY: unshare only changes this thread's (and its children's) mount namespace.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNS) },
            0,
            "a mount namespace: {}",
            std::io::Error::last_os_error()
        );
        // Nothing mounted from here on propagates to the machine.
        mount(
            "none",
            Path::new("/"),
            "",
            libc::MS_REC | libc::MS_PRIVATE,
            "",
        );
        let dir = scratch();
        let layers = dir.path().join("layers");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&layers).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        mount("tmpfs", &layers, "tmpfs", 0, "size=1g");
        std::fs::create_dir_all(layers.join("upper")).unwrap();
        std::fs::create_dir_all(layers.join("work")).unwrap();
        mount(
            "overlay",
            &root,
            "overlay",
            0,
            &format!(
                "lowerdir=/,upperdir={},workdir={}",
                layers.join("upper").display(),
                layers.join("work").display()
            ),
        );
        mount(
            "/proc",
            &root.join("proc"),
            "",
            libc::MS_BIND | libc::MS_REC,
            "",
        );
        mount(
            "/dev",
            &root.join("dev"),
            "",
            libc::MS_BIND | libc::MS_REC,
            "",
        );
        for fresh in ["run", "tmp"] {
            mount("tmpfs", &root.join(fresh), "tmpfs", 0, "mode=1777");
        }
        // "systemd runs" as far as the scripts can tell.
        std::fs::create_dir_all(root.join("run/systemd/system")).unwrap();
        let stub = root.join("usr/local/sbin/systemctl");
        std::fs::create_dir_all(stub.parent().unwrap()).unwrap();
        std::fs::write(&stub, SYSTEMCTL).unwrap();
        Command::new("chmod")
            .arg("0755")
            .arg(&stub)
            .status()
            .unwrap();
        // A leftover of this machine's own installation must not decide anything, and a
        // container's policy-rc.d (exit 101: "never start services") is not a gateway's.
        let _ = std::fs::remove_file(root.join("var/log/systemctl.calls"));
        let _ = std::fs::remove_file(root.join("usr/sbin/policy-rc.d"));
        Throwaway { root, _dir: dir }
    }

    /// `sh -c script` inside the root: (exit code, stdout and stderr).
    fn sh(&self, script: &str) -> (i32, String) {
        let out = Command::new("chroot")
            .arg(&self.root)
            .args(["/bin/sh", "-c", script])
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("chroot");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `sh -c script`, which must succeed; its output.
    fn ok(&self, script: &str) -> String {
        let (code, out) = self.sh(script);
        assert_eq!(code, 0, "{script}:\n{out}");
        out
    }

    /// The systemctl calls since the last time this was asked.
    fn systemctl_calls(&self) -> String {
        let path = self.root.join("var/log/systemctl.calls");
        let calls = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        calls
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }
}

/// Puts `deb` where the root can see it; its path inside.
fn hand_in(root: &Throwaway, deb: &Path) -> String {
    let inside = format!("/tmp/{}", deb.file_name().unwrap().to_str().unwrap());
    std::fs::copy(deb, root.path(&inside)).unwrap();
    inside
}

/// The shipped configuration with site_id and terminal_id set, and — the daemon runs in
/// this machine's network — a broker port where nothing listens and a page on a free port.
fn completed(shipped: &str) -> String {
    let text = shipped
        .replace("# site_id     = ", "site_id     = ")
        .replace("# terminal_id = ", "terminal_id = ")
        .replace("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1")
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"");
    assert!(text.contains("mqtt://127.0.0.1:1\"") && text.contains("127.0.0.1:0"));
    text
}

/// Completes the installed configuration, with `extra` appended.
fn complete_the_configuration(root: &Throwaway, extra: &str) {
    let path = root.path("/etc/id06d/id06d.toml");
    let text = completed(&std::fs::read_to_string(&path).unwrap()) + extra;
    std::fs::write(&path, text).unwrap();
}

/// Runs the installed daemon (this test's binary, on the root's files) until `done`.
fn run_daemon_until(root: &Throwaway, what: &str, mut done: impl FnMut() -> bool) {
    // The configuration names /var/lib/id06d: the daemon runs inside the root.
    let mut child = Command::new("chroot")
        .arg(&root.root)
        .args(["/usr/bin/id06d", "run", "--config", "/etc/id06d/id06d.toml"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the installed id06d");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, Duration::from_secs(30), &mut done)
    }));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = child.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn install_upgrade_remove_and_purge_keep_the_service_and_the_recorded_taps_right() {
    let debs = scratch();
    let first = build_deb(debs.path(), Some("0.2.0"));
    let second = build_deb(debs.path(), Some("0.2.0+upgrade1"));
    let root = Throwaway::new();
    // Install: the user, the unit enabled, not started (the shipped configuration has no
    // site_id yet), and a message that says how to finish.
    let deb = hand_in(&root, &first);
    let said = root.ok(&format!("dpkg -i {deb}"));
    assert!(
        said.contains("not started") && said.contains("site_id"),
        "{said}"
    );
    assert!(said.contains("systemctl start id06d"), "{said}");
    root.ok("getent passwd id06d");
    assert_eq!(root.ok("stat -c %G /etc/id06d/id06d.toml").trim(), "id06d");
    assert!(
        root.path("/etc/systemd/system/multi-user.target.wants/id06d.service")
            .is_symlink(),
        "enabled at boot"
    );
    let calls = root.systemctl_calls();
    assert!(calls.contains("daemon-reload"), "{calls}");
    assert!(!calls.contains(" start"), "not started: {calls}");
    // The installer finishes the configuration; the gate records three taps while the
    // broker is away, so they wait in the outbox.
    std::fs::write(
        root.path("/etc/id06d/taps.txt"),
        "at 0 present 04A10000000001\nat 200 absent\nat 400 present 04A10000000002\nat 600 absent\nat 800 present 04A10000000003\nat 1000 absent\nat 1200 end\n",
    )
    .unwrap();
    complete_the_configuration(
        &root,
        "\n[[reader]]\nname = \"sim\"\nkind = \"simulated\"\nscript = \"taps.txt\"\ndirection = \"in\"\n",
    );
    root.ok("id06d check-config >/dev/null");
    // Upgrade: the service is restarted (it was started by hand), the edited
    // configuration is kept.
    root.ok("systemctl start id06d.service");
    root.systemctl_calls();
    let deb = hand_in(&root, &second);
    let said = root.ok(&format!("dpkg -i {deb}"));
    assert!(!said.contains("not started"), "{said}");
    let calls = root.systemctl_calls();
    assert!(calls.contains("restart id06d.service"), "{calls}");
    assert!(
        std::fs::read_to_string(root.path("/etc/id06d/id06d.toml"))
            .unwrap()
            .contains("taps.txt"),
        "the administrator's configuration is kept"
    );
    run_daemon_until(&root, "three taps in the outbox", || {
        root.sh("id06d outbox stats")
            .1
            .contains("outbox depth:   3 ")
    });
    // Remove: stopped, the program gone, the data kept, and a warning about the taps.
    let said = root.ok("dpkg -r id06d");
    let calls = root.systemctl_calls();
    assert!(calls.contains("stop id06d.service"), "{calls}");
    assert!(
        said.contains("WARNING") && said.contains("3 recorded taps not delivered"),
        "{said}"
    );
    assert!(!root.path("/usr/bin/id06d").exists());
    assert!(
        root.path("/var/lib/id06d/db").is_dir(),
        "data kept on remove"
    );
    assert!(
        root.path("/etc/id06d/id06d.toml").exists(),
        "conffile kept on remove"
    );
    // Purge: the configuration goes, the data stays while it holds undelivered taps.
    let said = root.ok("dpkg -P id06d");
    assert!(said.contains("is NOT deleted"), "{said}");
    assert!(
        root.path("/var/lib/id06d/db").is_dir(),
        "undelivered taps kept on purge"
    );
    assert!(
        !root.path("/etc/id06d/id06d.toml").exists(),
        "conffile purged"
    );
    assert!(
        !root
            .path("/etc/systemd/system/multi-user.target.wants/id06d.service")
            .exists(),
        "the unit's links purged"
    );
}

#[test]
fn purging_a_gateway_that_delivered_everything_removes_its_data_and_a_valid_install_starts() {
    let debs = scratch();
    let deb = build_deb(debs.path(), Some("0.2.0"));
    let root = Throwaway::new();
    // A configuration completed before the package is installed (an image built ahead):
    // the service starts at once.
    std::fs::create_dir_all(root.path("/etc/id06d")).unwrap();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/id06d.toml"),
    )
    .unwrap();
    std::fs::write(root.path("/etc/id06d/id06d.toml"), completed(&shipped)).unwrap();
    let inside = hand_in(&root, &deb);
    let said = root.ok(&format!("dpkg -i --force-confold {inside}"));
    assert!(!said.contains("not started"), "{said}");
    let calls = root.systemctl_calls();
    assert!(calls.contains("start id06d.service"), "{calls}");
    // It ran without a tap: nothing is waiting.
    run_daemon_until(&root, "the data directory", || {
        root.sh("id06d outbox stats")
            .1
            .contains("outbox depth:   0 ")
    });
    let said = root.ok("dpkg -r id06d");
    assert!(!said.contains("WARNING"), "{said}");
    let said = root.ok("dpkg -P id06d");
    assert!(!said.contains("NOT deleted"), "{said}");
    assert!(
        !root.path("/var/lib/id06d").exists(),
        "data removed on purge"
    );
}
