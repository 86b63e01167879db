import subprocess
import sys

import pytest

from tasks import contract
from tasks.app import celery_config
from tasks.settings import Settings
from tests.conftest import REPO_ROOT


def test_queue_routing_by_name_prefix():
    assert contract.queue_for(contract.VISION_ANALYZE) == "vision"
    assert contract.queue_for(contract.AUDIO_GET_STATUS) == "audio"
    with pytest.raises(ValueError):
        contract.queue_for("other.task")


def test_celery_configuration_follows_the_contract():
    config = celery_config(Settings.from_env({"IDENT_VISIBILITY_TIMEOUT": "900", "IDENT_RESULT_EXPIRES": "60"}))
    assert config["task_serializer"] == config["result_serializer"] == "msgpack"
    assert "pickle" not in config["accept_content"] and "pickle" not in config["result_accept_content"]
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 2, "each pool process's next job waits in the worker"
    assert celery_config(Settings.from_env({"IDENT_PREFETCH_MULTIPLIER": "1"}))["worker_prefetch_multiplier"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] == 900
    assert config["result_expires"] == 60
    assert config["broker_url"] == config["result_backend"]
    assert config["task_routes"]["vision.*"]["queue"] == "vision"
    assert config["task_routes"]["audio.*"]["queue"] == "audio"


def test_tls_urls_verify_certificates():
    import ssl

    config = celery_config(Settings.from_env({"IDENT_REDIS_URL": "rediss://:pw@redis.example:6380/0"}))
    assert config["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert config["redis_backend_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert "ssl_ca_certs" not in config["broker_use_ssl"], "the system trust store by default"
    with_ca = celery_config(Settings.from_env({"IDENT_REDIS_URL": "rediss://redis.example:6380/0",
                                               "IDENT_REDIS_TLS_CA_CERTS": "/etc/ident/ca.pem"}))
    assert with_ca["broker_use_ssl"]["ssl_ca_certs"] == with_ca["redis_backend_use_ssl"]["ssl_ca_certs"] == "/etc/ident/ca.pem"
    assert "broker_use_ssl" not in celery_config(Settings.from_env({})), "plain redis:// uses no TLS"


def test_worker_apps_use_the_transport_that_reuses_its_client_and_producers_stock_kombu():
    from workers.kombu_internals import Transport
    from workers.vision import build_pipeline
    from workers.wiring import make_worker_app

    for url in ("redis://:secret@redis.example:6379/0", "rediss://redis.example:6380/0"):
        settings = Settings.from_env({"IDENT_REDIS_URL": url})
        connection = make_worker_app("vision", build_pipeline, settings).connection_for_write()
        assert isinstance(connection.transport, Transport)
        # What logs and Flower's broker view show: the URL's own scheme, password masked.
        assert connection.as_uri().startswith(url.split("://")[0] + "://")
        assert "secret" not in connection.as_uri()

    # Importing the contract alone changes nothing in kombu: a producer's process keeps stock kombu.
    code = (
        "import kombu.transport as t, kombu.transport.redis as r; from tasks.app import make_app; "
        "from tasks.settings import Settings; import tasks.client, tasks.contract, tasks.errors\n"
        "assert t.TRANSPORT_ALIASES['redis'] == 'kombu.transport.redis:Transport'\n"
        "assert type(make_app('p', Settings()).connection_for_write().transport) is r.Transport\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_a_prefetch_that_could_outlast_the_visibility_timeout_is_reported():
    held = Settings.from_env({"IDENT_VISIBILITY_TIMEOUT": "300", "IDENT_TASK_TIME_LIMIT": "180",
                              "IDENT_PREFETCH_MULTIPLIER": "2"})
    assert any("IDENT_PREFETCH_MULTIPLIER" in warning for warning in held.warnings())
    assert not Settings.from_env({"IDENT_VISIBILITY_TIMEOUT": "300", "IDENT_TASK_TIME_LIMIT": "180",
                                  "IDENT_PREFETCH_MULTIPLIER": "1"}).warnings()
    assert not Settings.from_env({}).warnings(), "the defaults are consistent"


def test_producer_side_imports_nothing_heavy():
    code = (
        "import sys, tasks.client, tasks.app, tasks.contract, tasks.errors, tasks.settings\n"
        "import ident.cli  # the `ident` command comes with the producer's install\n"
        "heavy = [m for m in ('onnxruntime', 'cv2', 'numpy', 'soundfile') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_dead_workers_jobs_are_swept_soon_after_the_visibility_timeout():
    # kombu's default sweep runs every 10 s x 10 calls: up to 100 s late.
    for timeout, interval in ((10, 1), (15, 1), (60, 6), (600, 10), (3600, 10)):
        options = celery_config(Settings.from_env({"IDENT_VISIBILITY_TIMEOUT": str(timeout)}))["broker_transport_options"]
        assert options["unacked_restore_interval"] == interval
        assert options["unacked_restore_throttle"] == 1


def test_cli_without_redis_says_so_instead_of_a_traceback(tmp_path):
    import os

    photo = tmp_path / "x.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 not much of a photo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env["IDENT_REDIS_URL"] = "redis://:secret@127.0.0.1:1/0"
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "submit", str(photo)], cwd=REPO_ROOT,
                               env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "cannot reach Redis at redis://**@127.0.0.1:1/0" in completed.stderr
    assert "Traceback" not in completed.stderr and "secret" not in completed.stderr


def test_submit_draws_one_image_and_says_so_before_sending_anything(tmp_path):
    import os

    photos = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for photo in photos:
        photo.write_bytes(b"\xff\xd8\xff\xe0 not much of a photo")
    drawn = tmp_path / "drawn.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env["IDENT_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens: it must fail before sending
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "submit", *map(str, photos), "--draw", str(drawn)],
                               cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "--draw draws the faces found in one image" in completed.stderr
    assert "cannot reach Redis" not in completed.stderr and not drawn.exists()


def test_demo_without_its_sample_files_says_where_it_looked(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env["IDENT_SAMPLES_DIR"] = str(tmp_path)
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "demo"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    said = " ".join(completed.stderr.split())  # rich wraps long lines
    assert "sample files are not there" in said and "IDENT_SAMPLES_DIR" in said and "embedded redis" not in said


def test_the_task_factory_names_each_argument_as_the_contract_does():
    import workers.audio
    import workers.vision

    expected = {
        "vision.analyze": ["image", "options"], "vision.verify": ["image_a", "image_b"], "vision.get_status": [],
        "audio.analyze": ["audio", "options"], "audio.verify": ["audio_a", "audio_b"], "audio.get_status": [],
        "vision.enroll": ["gallery", "subject_id", "image", "options"],
        "vision.identify": ["gallery", "image", "options"], "vision.forget": ["gallery", "subject_id"],
        "audio.enroll": ["gallery", "subject_id", "audio", "options"],
        "audio.identify": ["gallery", "audio", "options"], "audio.forget": ["gallery", "subject_id"],
    }
    for app in (workers.vision.app, workers.audio.app):
        names = {name for name in app.tasks if not name.startswith("celery.")}
        assert names == {name for name in expected if name.startswith(app.main.split(".")[1])}, "one kind per app"
        for name in names:
            task = app.tasks[name]
            assert list(task.arguments_signature.parameters) == expected[name]
            # Celery's own Task API is intact (canvas signatures are a method of Task).
            assert task.s(*(["x"] * len(expected[name]))).task == name
