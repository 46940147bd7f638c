"""Where study data lives: the storage URL, the Optuna storage behind it, and the artifact store.

URL forms (the same as Optuna's where Optuna has one):
* `sqlite:///storage/pcvit.db` (relative; `sqlite:////abs/path.db` absolute): one worker, the default.
* `storage/journal.log` (a plain file path; also `journal:///storage/journal.log`, `journal:////abs/path`):
  Optuna's journal file, for several workers on one machine without a database server. The plain path is
  what `optuna` (through `OPTUNA_STORAGE` too) and `optuna-dashboard` read as a journal file.
* `postgresql+psycopg2://user@host:5432/db` (password from `PGPASSWORD` or `~/.pgpass`, never the repo):
  many workers on many machines.
* `grpc://host:13000`: Optuna's gRPC storage proxy (`pcvit-study proxy`) in front of PostgreSQL, for more
  workers than the server has connections for (see `storage.proxy`).
The URL comes from the command line, else `OPTUNA_STORAGE` (what Optuna's own CLI reads), else the default.
Artifacts (images, metrics, weights; checkpoints, see `storage.checkpoints`) go to a file-system store:
`--artifact-dir`, else `PCVIT_ARTIFACT_DIR`, else `storage/artifacts`; point `optuna-dashboard --artifact-dir`
at the same folder.
"""

from storage.artifacts import ARTIFACT_DIR_ENV, DEFAULT_ARTIFACT_DIR, artifact_folder, artifact_store
from storage.opening import STARTUP_PATIENCE_S, open_storage, wait_for_storage
from storage.optuna_access import DB_PATIENCE_S, DB_UNREACHABLE
from storage.postgres import StorageError, StorageUnreachable, mask_password
from storage.proxy import is_proxy_url
from storage.urls import DEFAULT_URL, URL_ENV, is_journal, journal_path, local_file, require_existing, resolve_url

__all__ = [
    "ARTIFACT_DIR_ENV", "DB_PATIENCE_S", "DB_UNREACHABLE", "DEFAULT_ARTIFACT_DIR", "DEFAULT_URL", "STARTUP_PATIENCE_S",
    "StorageError", "StorageUnreachable", "URL_ENV", "artifact_folder", "artifact_store", "is_journal", "is_proxy_url",
    "journal_path", "local_file", "mask_password", "open_storage", "require_existing", "resolve_url",
    "wait_for_storage",
]
