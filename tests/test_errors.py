"""Error codes are unique and travel: one code always means one class and one status."""

from __future__ import annotations

import json

import pytest

from backends import errors
from backends.redis.protocol import error_from_reply, error_reply


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


def test_every_error_class_has_its_own_code_and_a_4xx_or_5xx_status():
    classes = [errors.TapmaskError, *_all_subclasses(errors.TapmaskError)]
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), sorted(codes)
    assert all(400 <= cls.status < 600 for cls in classes)
    assert {code: cls for code, cls in errors.error_codes().items()} == {
        cls.code: cls for cls in classes
    }


def test_a_second_class_cannot_take_a_code():
    with pytest.raises(TypeError, match="taken"):

        class Twin(errors.TapmaskError, status=400, code="bad_prompt"):
            pass


@pytest.mark.parametrize("cls", [errors.TapmaskError, *_all_subclasses(errors.TapmaskError)])
def test_every_error_comes_back_across_redis_as_itself(cls):
    exc = cls("what went wrong")
    back = error_from_reply(json.loads(json.dumps(error_reply(exc))))
    assert type(back) is cls and back.status == cls.status and str(back) == "what went wrong"
    assert back.to_dict() == {"error": cls.code, "detail": "what went wrong"}
