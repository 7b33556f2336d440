"""StreamPodSandboxes, StreamContainers and StreamImages: the entries of their List
counterparts, with the same filters, in pages.

In process over a real store at node scale (1,000 containers, pages of several MiB), then
through a daemon with a real pod, container and pulled images.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from google.protobuf.message import Message

from cri_api import api_pb2 as pb
from sandbox import containers, pods
from sandbox.config import Config
from sandbox.records import (
    EXITED,
    RUNNING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
    ContainerRecord,
    PodRecord,
    insert_container,
    insert_pod,
)
from sandbox.runtime import Paths, Runtime
from sandbox.store import Store
from sandbox.wire import STREAM_PAGE_BYTES, pages
from tests.cri import CriClient
from tests.pods import a_pod, container_config, start_container
from tests.support.plugin import TestImages

PODS = 100
CONTAINERS_PER_POD = 10
# Big enough that 1,000 containers need several stream messages.
ANNOTATION = "x" * 4096


@pytest.fixture
def node(tmp_path: Path) -> Runtime:
    """A runtime holding 100 pods with 10 containers each, every fifth pod NOTREADY and every
    third container EXITED."""
    rt = Runtime(config=Config(), store=Store(tmp_path / "state.db"),
                 paths=Paths(tmp_path / "root", tmp_path / "state"))
    for p in range(PODS):
        pod_id = f"{p:04d}" + "a" * 60
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=f"pod-{p}", uid=f"u{p}", namespace="ns"),
            labels={"app": f"app-{p % 7}"}, annotations={"big": ANNOTATION},
        )
        pod = PodRecord(id=pod_id, name=f"pod-{p}", created_at=time.time_ns(), config=config,
                        state=SANDBOX_NOTREADY if p % 5 == 0 else SANDBOX_READY)
        assert insert_pod(rt.store, pod) is None
        rt.pods[pod.id] = pod
        for c in range(CONTAINERS_PER_POD):
            n = p * CONTAINERS_PER_POD + c
            ctr_config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=f"c{c}"),
                                            labels={"tier": f"t{n % 3}"},
                                            annotations={"big": ANNOTATION})
            ctr = ContainerRecord(id=f"{n:05d}" + "b" * 59, pod_id=pod_id, name=f"c{c}-{p}",
                                  created_at=time.time_ns(), config=ctr_config,
                                  image_ref="busybox", state=EXITED if n % 3 == 0 else RUNNING)
            assert insert_container(rt.store, ctr) is None
            rt.containers[ctr.id] = ctr
    return rt


async def _collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [page async for page in stream]


def _pod_filters() -> list[pb.PodSandboxFilter | None]:
    return [
        None,
        pb.PodSandboxFilter(id="0042"),
        pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY)),
        pb.PodSandboxFilter(label_selector={"app": "app-3"}),
        pb.PodSandboxFilter(id="nothing-has-this-id"),
    ]


def _container_filters() -> list[pb.ContainerFilter | None]:
    return [
        None,
        pb.ContainerFilter(pod_sandbox_id="0007"),
        pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_EXITED)),
        pb.ContainerFilter(label_selector={"tier": "t1"}),
        pb.ContainerFilter(id="00123"),
        pb.ContainerFilter(id="nothing-has-this-id"),
    ]


@pytest.mark.parametrize("flt", _pod_filters())
def test_stream_pod_sandboxes_equals_list_pod_sandbox(
    node: Runtime, flt: pb.PodSandboxFilter | None
) -> None:
    listed = pb.ListPodSandboxResponse.FromString(
        pods.list_pod_sandbox(node, pb.ListPodSandboxRequest(filter=flt))
    ).items
    raw_pages = asyncio.run(_collect(
        pods.stream_pod_sandboxes(node, pb.StreamPodSandboxesRequest(filter=flt))
    ))
    _check_streamed(listed, raw_pages,
                    lambda raw: pb.StreamPodSandboxesResponse.FromString(raw).pod_sandboxes)


@pytest.mark.parametrize("flt", _container_filters())
def test_stream_containers_equals_list_containers(
    node: Runtime, flt: pb.ContainerFilter | None
) -> None:
    listed = pb.ListContainersResponse.FromString(
        containers.list_containers(node, pb.ListContainersRequest(filter=flt))
    ).containers
    raw_pages = asyncio.run(_collect(
        containers.stream_containers(node, pb.StreamContainersRequest(filter=flt))
    ))
    streamed = _check_streamed(
        listed, raw_pages, lambda raw: pb.StreamContainersResponse.FromString(raw).containers
    )
    if flt is None:
        assert len(streamed) == PODS * CONTAINERS_PER_POD
        # 1,000 entries of over 4 KiB: the stream never builds one message of them all.
        assert len(raw_pages) >= 4


def _check_streamed(
    listed: Sequence[Message], raw_pages: list[bytes],
    entries_of: Callable[[bytes], Sequence[Message]],
) -> list[Message]:
    """The entries of a stream's raw messages, checked against its List answer: the same
    entries in the same order, each message within the page bound, at least one message
    (an empty stream still answers once)."""
    streamed = [entry for raw in raw_pages for entry in entries_of(raw)]
    assert streamed == list(listed)
    assert all(len(raw) <= STREAM_PAGE_BYTES for raw in raw_pages)
    assert len(raw_pages) >= 1
    return streamed


def test_pages_keep_entries_whole_and_in_order() -> None:
    entries = [bytes([n]) * size for n, size in enumerate([3, 3, 3, 10, 1, 1])]
    assert list(pages(entries, max_bytes=6)) == [
        entries[0] + entries[1], entries[2], entries[3], entries[4] + entries[5],
    ]
    assert list(pages([], max_bytes=6)) == [b""]


def test_stream_rpcs_through_the_daemon_equal_their_lists(
    fp: CriClient, pulled: TestImages, tmp_path: Path
) -> None:
    with a_pod(fp, tmp_path, labels={"stream": "yes"}) as (pod_id, pod):
        ctr_id = start_container(fp, pod_id, pod,
                                 container_config(pulled.busybox.reference,
                                                  command=["sleep", "1000"],
                                                  labels={"stream": "ctr"}))
        pod_filter = pb.PodSandboxFilter(label_selector={"stream": "yes"})
        streamed_pods = [p for page in fp.StreamPodSandboxes(
            pb.StreamPodSandboxesRequest(filter=pod_filter)) for p in page.pod_sandboxes]
        assert [p.id for p in streamed_pods] == [pod_id]
        assert streamed_pods == list(
            fp.ListPodSandbox(pb.ListPodSandboxRequest(filter=pod_filter)).items)

        ctr_filter = pb.ContainerFilter(pod_sandbox_id=pod_id)
        streamed_ctrs = [c for page in fp.StreamContainers(
            pb.StreamContainersRequest(filter=ctr_filter)) for c in page.containers]
        assert [c.id for c in streamed_ctrs] == [ctr_id]
        assert streamed_ctrs == list(
            fp.ListContainers(pb.ListContainersRequest(filter=ctr_filter)).containers)

    streamed_images = [i for page in fp.StreamImages(pb.StreamImagesRequest())
                       for i in page.images]
    listed_images = list(fp.ListImages(pb.ListImagesRequest()).images)
    assert streamed_images == listed_images
    assert pulled.busybox.reference in {t for i in listed_images for t in i.repo_tags}
    one = pb.ImageFilter(image=pb.ImageSpec(image=pulled.web.reference))
    streamed_one = [i for page in fp.StreamImages(pb.StreamImagesRequest(filter=one))
                    for i in page.images]
    assert [i.repo_tags for i in streamed_one] == [[pulled.web.reference]]
