"""AppArmor profiles for containers: which loaded profile a CRI security context names.

flatpod loads no profile itself: a Localhost profile is one the operator loaded into the
kernel (`apparmor_parser`), named as in `/sys/kernel/security/apparmor/profiles`, and runc
applies it (OCI `process.apparmorProfile`). A profile that is not loaded, or any Localhost
profile on a node without AppArmor, is refused rather than silently running the container
unconfined. RuntimeDefault and Unconfined apply no profile (flatpod ships no default profile).
"""

from __future__ import annotations

from pathlib import Path

from cri_api import api_pb2 as pb

ENABLED_FILE = Path("/sys/module/apparmor/parameters/enabled")
PROFILES_FILE = Path("/sys/kernel/security/apparmor/profiles")
# kubelet and critest name a Localhost profile "localhost/<name>", in both fields.
LOCALHOST_PREFIX = "localhost/"
LEGACY_NO_PROFILE = ("", "runtime/default", "unconfined")


class AppArmorError(ValueError):
    """A security context names an AppArmor profile that cannot be applied here."""


def profiles_file_if_enabled(enabled_file: Path = ENABLED_FILE) -> Path | None:
    """The kernel's list of loaded profiles where AppArmor is enabled, else None."""
    try:
        on = enabled_file.read_text().startswith("Y")
    except OSError:
        return None
    return PROFILES_FILE if on else None


def requested_profile(profile: pb.SecurityProfile | None, legacy: str) -> str | None:
    """The Localhost profile name a security context asks for, None for none. The `apparmor`
    field wins over the deprecated `apparmor_profile` string, as in containerd."""
    if profile is not None:
        if profile.profile_type != pb.SecurityProfile.Localhost:
            return None
        return profile.localhost_ref.removeprefix(LOCALHOST_PREFIX)
    if legacy in LEGACY_NO_PROFILE:
        return None
    if legacy.startswith(LOCALHOST_PREFIX):
        return legacy.removeprefix(LOCALHOST_PREFIX)
    raise AppArmorError(f"apparmor_profile: unknown profile {legacy[:200]!r}")


def loaded_profiles(profiles_file: Path) -> set[str]:
    """Names of the loaded profiles: each line is `<name> (<mode>)`."""
    try:
        lines = profiles_file.read_text().splitlines()
    except OSError as err:
        raise AppArmorError(
            f"reading the loaded AppArmor profiles ({profiles_file}): {err}") from err
    return {line.rsplit(" (", 1)[0] for line in lines if line}


def profile_for(
    profile: pb.SecurityProfile | None, legacy: str, profiles_file: Path | None, where: str
) -> str | None:
    """The OCI `process.apparmorProfile` for a security context, None for none. profiles_file
    is the kernel's list of loaded profiles, None where AppArmor is not enabled."""
    try:
        name = requested_profile(profile, legacy)
    except AppArmorError as err:
        raise AppArmorError(f"{where}.{err}") from err
    if name is None:
        return None
    if not name or "\x00" in name:
        raise AppArmorError(f"{where}.apparmor: a Localhost profile needs a name")
    if profiles_file is None:
        raise AppArmorError(
            f"{where}.apparmor: profile {name[:200]!r} asked for, but AppArmor is not enabled "
            "on this node")
    if name not in loaded_profiles(profiles_file):
        raise AppArmorError(f"{where}.apparmor: AppArmor profile {name[:200]!r} is not loaded")
    return name
