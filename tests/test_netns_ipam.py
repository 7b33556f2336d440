"""IPAM over the JSON lease book: uniqueness under concurrency, idempotence, release."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netns.ipam import AddressPoolExhausted, JsonFileLeaseBook, allocate

SUBNET = "10.232.0.0/29"  # hosts .1-.6, gateway .1 -> 5 leasable


def test_allocate_skips_gateway_and_is_idempotent(tmp_path: Path) -> None:
    book = JsonFileLeaseBook(tmp_path / "leases.json")
    first = allocate(book, "n", SUBNET, None, "pod-a")
    assert first == IPv4Interface("10.232.0.2/29")
    assert allocate(book, "n", SUBNET, None, "pod-a") == first  # a retry gets the same ip
    assert allocate(book, "n", SUBNET, None, "pod-b") == IPv4Interface("10.232.0.3/29")
    assert book.owned_by("n", "pod-a") == ["10.232.0.2"]


def test_custom_gateway_is_never_leased(tmp_path: Path) -> None:
    book = JsonFileLeaseBook(tmp_path / "leases.json")
    got = {str(allocate(book, "n", SUBNET, "10.232.0.3", f"p{i}").ip) for i in range(5)}
    assert got == {"10.232.0.1", "10.232.0.2", "10.232.0.4", "10.232.0.5", "10.232.0.6"}


def test_exhaustion_and_release_frees_the_address(tmp_path: Path) -> None:
    book = JsonFileLeaseBook(tmp_path / "leases.json")
    for i in range(5):
        allocate(book, "n", SUBNET, None, f"p{i}")
    with pytest.raises(AddressPoolExhausted):
        allocate(book, "n", SUBNET, None, "late")
    book.release("n", "p2")
    book.release("n", "p2")  # idempotent
    assert allocate(book, "n", SUBNET, None, "late") == IPv4Interface("10.232.0.4/29")
    assert "p2" not in book.leased("n").values()


def test_networks_are_independent(tmp_path: Path) -> None:
    book = JsonFileLeaseBook(tmp_path / "leases.json")
    a = allocate(book, "one", SUBNET, None, "pod")
    b = allocate(book, "two", SUBNET, None, "pod")
    assert a == b
    book.release("one", "pod")
    assert book.owned_by("two", "pod") == [str(b.ip)]


def test_concurrent_allocation_never_double_assigns(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    subnet = IPv4Network("10.232.0.0/26")  # 61 leasable
    owners = [f"pod-{i}" for i in range(61)]
    start = threading.Barrier(8)

    def claim(owner: str) -> str:
        if owner in owners[:8]:
            start.wait()
        # A separate book object per call: mimics separate processes sharing the file.
        return str(allocate(JsonFileLeaseBook(path), "n", subnet, None, owner).ip)

    with ThreadPoolExecutor(max_workers=8) as pool:
        ips = list(pool.map(claim, owners))
    assert len(set(ips)) == len(owners)
    leased = JsonFileLeaseBook(path).leased("n")
    assert {leased[ip] for ip in ips} == set(owners)
    assert all(ip != "10.232.0.1" for ip in ips)
    with pytest.raises(AddressPoolExhausted):
        allocate(JsonFileLeaseBook(path), "n", subnet, None, "one-too-many")


def test_try_claim_is_exclusive(tmp_path: Path) -> None:
    book = JsonFileLeaseBook(tmp_path / "leases.json")
    assert book.try_claim("n", "10.232.0.9", "a")
    assert not book.try_claim("n", "10.232.0.9", "b")
    assert book.leased("n") == {"10.232.0.9": "a"}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=40))
def test_random_claim_release_keeps_one_owner_per_ip(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[bool, int]]
) -> None:
    book = JsonFileLeaseBook(tmp_path_factory.mktemp("ipam") / "leases.json")
    held: dict[str, str] = {}
    for is_alloc, n in ops:
        owner = f"o{n}"
        if is_alloc:
            try:
                held[owner] = str(allocate(book, "n", SUBNET, None, owner).ip)
            except AddressPoolExhausted:
                assert len(held) == 5
        else:
            book.release("n", owner)
            held.pop(owner, None)
    leased = book.leased("n")
    assert leased == {ip: owner for owner, ip in held.items()}
    assert "10.232.0.1" not in leased
