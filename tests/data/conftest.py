import pytest


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """The two HF tokenizer folders of test_chat (ChatML and Llama 3), built once for the chat tests."""
    pytest.importorskip("transformers")
    from .test_chat import make_folders

    return make_folders(tmp_path_factory)
