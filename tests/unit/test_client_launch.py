"""A remote launch whose answer does not come: the client's error says the manager may
still be launching the VM, and where to look."""

from __future__ import annotations

import httpx
import pytest

from vnic.client.manager import ManagerClient
from vnic.errors import Unavailable
from vnic.manager.results import VmRequest


def _timing_out(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


@pytest.fixture
def client() -> ManagerClient:
    c = ManagerClient("http://127.0.0.1:9", "t")
    c._http = httpx.Client(transport=httpx.MockTransport(_timing_out), base_url=c.url)
    return c


def test_a_launch_that_times_out_says_it_may_still_run(client: ManagerClient) -> None:
    with pytest.raises(Unavailable) as got:
        client.launch_vm("lab", "a")
    text = str(got.value)
    assert "timed out" in text
    assert "may still be launching lab/a" in text and "vnic vm list lab" in text


def test_a_new_vm_whose_launch_times_out_says_it_too(client: ManagerClient) -> None:
    with pytest.raises(Unavailable) as got:
        client.add_and_launch(VmRequest(session="lab", name="b"))
    assert "may still be launching lab/b" in str(got.value)


def test_other_requests_keep_their_plain_error(client: ManagerClient) -> None:
    with pytest.raises(Unavailable) as got:
        client.list_vms("lab")
    assert "may still be launching" not in str(got.value)
