import numpy as np

from backends import images
from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.models.grabcut import GrabCutSegmenter
from backends.prompts import Click, Prompt
from tests.test_engine import CountingModel


def _image() -> bytes:
    arr = np.full((60, 80, 3), 20, np.uint8)
    arr[15:45, 20:60] = (230, 200, 40)
    return images.encode_png(arr)


def test_local_dispatcher_segments_in_process():
    dispatcher = LocalDispatcher(Engine({"grabcut": GrabCutSegmenter()}))
    seg = dispatcher.segment("grabcut", _image(), Prompt((Click(40, 30),)))
    assert seg.mask[30, 40] and not seg.mask[2, 2]
    assert dispatcher.models() == ["grabcut"]
    dispatcher.close()


def test_prefetch_encodes_in_background_so_the_first_click_is_decode_only():
    model = CountingModel(encode_seconds=0.05)
    engine = Engine({"m": model})
    dispatcher = LocalDispatcher(engine)
    dispatcher.prefetch("m", _image())
    dispatcher.prefetch("m", _image())  # deduplicated while pending, cached afterwards
    dispatcher.wait_prefetches(timeout=10)
    assert model.encodes == 1
    dispatcher.segment("m", _image(), Prompt((Click(1, 1),)))
    assert model.encodes == 1
    dispatcher.close()
