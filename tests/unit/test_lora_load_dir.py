"""The path check of POST /v1/load_lora_adapter: only folders under --lora-load-dir, never through a symbolic link,
and nothing outside the allowed folder is looked at (issue 14, item 7)."""

import os
import threading
from pathlib import Path

import pytest

from server.api.errors import ApiError
from server.api.lora_load_dir import open_adapter_files, relative_parts

CONFIG, WEIGHTS = b'{"peft_type": "LORA"}', b"weights-bytes"


def adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes(CONFIG)
    (folder / "adapter_model.safetensors").write_bytes(WEIGHTS)
    return folder


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """allowed/ with a good adapter at allowed/team/a, and an adapter outside it."""
    allowed = tmp_path / "allowed"
    return {"allowed": allowed, "good": adapter(allowed / "team" / "a"), "outside": adapter(tmp_path / "outside")}


def refusal(allowed: Path, lora_path: str | Path) -> tuple[int, str, str]:
    with pytest.raises(ApiError) as info:
        with open_adapter_files(allowed, str(lora_path)):
            pass
    return info.value.status, info.value.type, info.value.message


def read(allowed: Path, lora_path: str | Path) -> tuple[bytes, bytes]:
    with open_adapter_files(allowed, str(lora_path)) as (config, weights):
        return config.read(), weights.read()


def test_a_folder_under_the_allowed_one_is_opened(tree) -> None:
    assert read(tree["allowed"], tree["good"]) == (CONFIG, WEIGHTS)
    spelled = f"{tree['allowed']}//team/./a/"  # the same folder, written loosely
    assert read(tree["allowed"], spelled) == (CONFIG, WEIGHTS)


def test_the_allowed_folder_itself_may_be_the_adapter(tmp_path) -> None:
    allowed = adapter(tmp_path / "only")
    assert read(allowed, allowed) == (CONFIG, WEIGHTS)


def test_an_allowed_folder_configured_through_a_link_takes_both_spellings(tree, tmp_path) -> None:
    link = tmp_path / "mnt-models"
    link.symlink_to(tree["allowed"])
    assert read(link, link / "team" / "a") == (CONFIG, WEIGHTS)  # as configured
    assert read(link, tree["good"]) == (CONFIG, WEIGHTS)  # as it resolves


@pytest.mark.parametrize(
    "path, status",
    [
        ("team/a", 400),  # relative: never taken relative to the working directory
        ("", 400),
        ("team\x00/a", 400),
    ],
)
def test_malformed_paths_are_refused(tree, path, status) -> None:
    assert refusal(tree["allowed"], path)[0] == status


def test_dot_dot_is_refused_even_when_it_would_stay_inside(tree) -> None:
    allowed = tree["allowed"]
    for path in (f"{allowed}/team/../team/a", f"{allowed}/../outside", f"{allowed}/team/a/.."):
        status, type_, message = refusal(allowed, path)
        assert (status, type_) == (403, "forbidden") and "'..'" in message


def test_paths_outside_are_refused_without_looking_at_them(tree, tmp_path) -> None:
    allowed = tree["allowed"]
    evil_sibling = adapter(tmp_path / "allowed-evil")  # shares the allowed folder's name as a prefix
    for path in (tree["outside"], evil_sibling, Path("/"), Path("/etc"), tmp_path, tmp_path / "does-not-exist"):
        status, _, message = refusal(allowed, path)
        assert status == 403 and "is not under" in message, path  # the same answer, existing or not


@pytest.mark.parametrize("target", ["outside", "good"])
def test_a_symlinked_folder_is_refused_wherever_it_points(tree, target) -> None:
    link = tree["allowed"] / "link"
    link.symlink_to(tree[target])
    status, _, message = refusal(tree["allowed"], link)
    assert status == 403 and "symbolic link" in message


def test_a_symlink_in_the_middle_of_the_path_is_refused(tree) -> None:
    (tree["allowed"] / "via").symlink_to(tree["outside"].parent)
    status, _, message = refusal(tree["allowed"], tree["allowed"] / "via" / "outside")
    assert status == 403 and "'via' is a symbolic link" in message


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_symlinked_adapter_file_is_refused(tree, name) -> None:
    folder = tree["allowed"] / "linked-file"
    adapter(folder)
    (folder / name).unlink()
    (folder / name).symlink_to(tree["outside"] / name)
    status, _, message = refusal(tree["allowed"], folder)
    assert status == 403 and f"its {name} is a symbolic link" in message


def test_a_file_is_not_a_folder_and_a_missing_folder_is_404(tree) -> None:
    assert refusal(tree["allowed"], tree["good"] / "adapter_config.json")[0] == 400
    assert refusal(tree["allowed"], tree["allowed"] / "team" / "nope")[0] == 404
    assert refusal(tree["allowed"], tree["allowed"] / "nope" / "deeper")[0] == 404


def test_a_folder_without_the_peft_files_is_an_invalid_adapter(tree) -> None:
    (tree["good"] / "adapter_model.safetensors").unlink()
    status, type_, message = refusal(tree["allowed"], tree["good"])
    assert (status, type_) == (422, "invalid_adapter") and "adapter_model.safetensors" in message


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(tree) -> None:
    weights = tree["good"] / "adapter_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    answer: list[tuple[int, str, str]] = []
    worker = threading.Thread(target=lambda: answer.append(refusal(tree["allowed"], tree["good"])), daemon=True)
    worker.start()
    worker.join(10)
    assert answer and answer[0][:2] == (422, "invalid_adapter"), "opening the FIFO blocked"


def test_a_link_swapped_in_after_the_check_is_not_followed(tree, monkeypatch) -> None:
    """The race: the check sees a folder, then a symbolic link is in its place when it is opened. Simulated by a
    stat that follows links (it reports the link's target, a folder): the O_NOFOLLOW open still refuses."""
    (tree["allowed"] / "swapped").symlink_to(tree["outside"])
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *, dir_fd=None, follow_symlinks=True: real_stat(path, dir_fd=dir_fd))
    assert refusal(tree["allowed"], tree["allowed"] / "swapped")[0] == 403
    folder = adapter(tree["allowed"] / "swapped-file")
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").symlink_to(tree["outside"] / "adapter_config.json")
    assert refusal(tree["allowed"], folder)[0] == 403


def test_relative_parts_is_decided_from_the_text(tree) -> None:
    allowed = tree["allowed"]
    assert relative_parts(allowed, f"{allowed}/x/y") == ("x", "y")  # needs nothing on disk
    assert relative_parts(allowed, str(allowed)) == ()
