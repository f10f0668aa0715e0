//! weft's OCI image (`deploy/image/build.sh`, issue 17): built here without a daemon (umoci, from
//! scratch) from the binaries this test run uses, unpacked again with umoci, and checked from its own
//! root filesystem: every binary runs (`--version`, so every shared library it loads is in the
//! image), the sidecar as uid 1337, `sidecar init` installs its iptables rules from inside the image
//! in a network namespace of the test's own, the config says user 1337 and no entrypoint, and
//! nothing in it is setuid or a shell. Needs root (chroot, namespaces) and umoci; skips otherwise,
//! printing why.

use std::path::Path;
use std::process::Command;

use weft_tests::{bin, run};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Why this machine cannot build and inspect the image, if it cannot.
fn unavailable() -> Option<String> {
    let uid = run(Command::new("id").arg("-u")).ok()?.1;
    if uid.trim() != "0" {
        return Some("needs root (chroot and a network namespace)".into());
    }
    if !run(Command::new("sh").args(["-c", "command -v umoci"])).is_ok_and(|(ok, _, _)| ok) {
        return Some("umoci is not installed (deploy/local/install-deps.sh installs it)".into());
    }
    None
}

fn chroot(rootfs: &Path, user: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new("chroot");
    if let Some(user) = user {
        cmd.arg(format!("--userspec={user}"));
    }
    run(cmd.arg(rootfs).args(args)).unwrap()
}

#[test]
fn the_image_builds_from_scratch_and_its_binaries_run_from_its_own_root() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP image: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("image");
    let bins = bin("ca").parent().unwrap().to_owned();
    let profile = bins.file_name().unwrap().to_string_lossy().into_owned();
    let target = bins.parent().unwrap().to_owned();
    let (ok, stdout, stderr) = run(Command::new(repo().join("deploy/image/build.sh"))
        .args(["--profile", &profile, "--out"])
        .arg(&out)
        .env("CARGO_TARGET_DIR", &target))
    .unwrap();
    assert!(ok, "build.sh failed:\n{stdout}\n{stderr}");
    assert!(
        out.join(format!("weft-{}.oci.tar", version())).is_file(),
        "{stdout}"
    );

    // Unpack it as a runtime would.
    let bundle = dir.path().join("bundle");
    let image = format!("{}:{}", out.join("oci").display(), version());
    let (ok, o, e) = run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle))
    .unwrap();
    assert!(ok, "umoci unpack: {o}{e}");
    let rootfs = bundle.join("rootfs");

    // Each binary runs from the image's root alone; the sidecar also as its uid.
    for b in ["ca", "pilot", "sidecar"] {
        let (ok, o, e) = chroot(
            &rootfs,
            None,
            &[&format!("/usr/local/bin/{b}"), "--version"],
        );
        assert!(ok, "{b} --version in the image: {o}{e}");
        assert_eq!(o.trim(), format!("{b} {}", version()));
    }
    let (ok, o, e) = chroot(&rootfs, Some("1337:1337"), &["sidecar", "--version"]);
    assert!(ok && o.contains("sidecar"), "sidecar as 1337: {o}{e}");
    for iptables in ["iptables", "iptables-legacy"] {
        let (ok, o, e) = chroot(&rootfs, None, &[iptables, "--version"]);
        assert!(ok, "{iptables} in the image: {o}{e}");
    }

    // The init container's job, from inside the image: iptables with the image's own modules.
    let ns = format!("weft-img-{}", std::process::id());
    let (ok, o, e) = run(Command::new("ip").args(["netns", "add", &ns])).unwrap();
    assert!(ok, "ip netns add: {o}{e}");
    // A runtime gives the container /dev and /proc (the sidecar opens /dev/null for iptables'
    // stdin): mounted here in a private mount namespace, so nothing outlives the command.
    std::fs::create_dir_all(rootfs.join("dev")).unwrap();
    std::fs::create_dir_all(rootfs.join("proc")).unwrap();
    let init = run(Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
        ])
        .arg(
            "mount --rbind /dev \"$1/dev\" && mount -t proc proc \"$1/proc\" && \
             exec env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin chroot \"$1\" sidecar init",
        )
        .arg("sh")
        .arg(&rootfs));
    let rules = run(Command::new("ip").args(["netns", "exec", &ns, "iptables-save", "-t", "nat"]));
    let _ = run(Command::new("ip").args(["netns", "del", &ns]));
    let (ok, o, e) = init.unwrap();
    assert!(ok, "sidecar init in the image: {o}{e}");
    let (_, rules, _) = rules.unwrap();
    assert!(
        rules.contains("REDIRECT") && rules.contains("--uid-owner 1337"),
        "no capture rules after sidecar init:\n{rules}"
    );

    // The config: user 1337, no entrypoint (the manifest's command chooses the binary).
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["process"]["user"]["uid"], 1337, "{config}");
    assert_eq!(config["process"]["user"]["gid"], 1337, "{config}");

    // Nothing else that runs as root: no setuid/setgid file, no shell.
    let (_, setuid, _) = run(Command::new("find")
        .arg(&rootfs)
        .args(["-perm", "/6000", "-type", "f"]))
    .unwrap();
    assert_eq!(setuid.trim(), "", "setuid/setgid files in the image");
    for shell in ["bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/bash"] {
        assert!(!rootfs.join(shell).exists(), "{shell} in the image");
    }

    // The Dockerfile builds the same files with the same script.
    let dockerfile = std::fs::read_to_string(repo().join("deploy/image/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("RUN /rootfs.sh /rootfs /bins"),
        "{dockerfile}"
    );
    assert!(dockerfile.contains("USER 1337:1337"), "{dockerfile}");
}

#[test]
fn pilot_inject_names_the_image_by_default() {
    let (ok, out, err) = run(Command::new(bin("pilot"))
        .args(["inject", "-f"])
        .arg(repo().join("deploy/examples/sleep.yaml")))
    .unwrap();
    assert!(ok, "{err}");
    let image = format!("image: weft/weft:{}", version());
    assert!(out.matches(&image).count() >= 2, "{out}");
}
