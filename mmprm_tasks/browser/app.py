"""The annotation browser: a FastAPI app of server-rendered pages over the step index and the store.

Airflow's api-server mounts it under ``/mmprm`` (:mod:`mmprm_tasks.browser.plugin`).  Plugin apps
are not protected by Airflow automatically, so every route depends on :func:`require_run_reader`:
the caller is resolved by Airflow's own ``get_user`` (an ``Authorization: Bearer`` JWT, else the
UI's ``_token`` cookie) and must have read access to DAG runs under the configured auth manager.
No token: 401, or for a browser page a redirect to Airflow's login; a user without that
permission: 403.  Links inside the pages are paths under the mount point, so they work inside the
Airflow UI's frame and on their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..settings import Settings, get_settings
from ..validation import escape_text, id_problem, text_problem
from . import charts, data

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
MOUNT_PREFIX = "/mmprm"
MAX_OFFSET = 2**63 - 1  # Postgres' bigint: a larger OFFSET is an error there


def _get_user_dependency():
    # Airflow's own resolution of the caller (bearer header first, else the UI's cookie).
    from airflow.api_fastapi.core_api.security import get_user

    return get_user


def require_run_reader(request: Request, user: Any = Depends(_get_user_dependency())) -> Any:
    """The caller, if the auth manager lets them read DAG runs; else 403."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity

    if not get_auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, user=user):
        raise HTTPException(status_code=403, detail=f"user {user.get_name()!r} may not read DAG runs")
    return user


def require_valid_url(request: Request, user: Any = Depends(require_run_reader)) -> Any:
    """After the permission check: every id in the path follows the one id rule
    (mmprm_tasks.validation; a DAG run's ids are Airflow's and need only be text) and every query
    value is text, else 404 / 400 naming the escaped value, before any query runs (a NUL reached
    Postgres as a 500)."""
    route = request.scope.get("route")
    airflow_ids = getattr(route, "path", "").startswith("/dag-runs/")
    for name, value in request.path_params.items():
        problem = text_problem(value) if airflow_ids else id_problem(value)
        if problem:
            raise HTTPException(status_code=404, detail=f"{name} {escape_text(value, 100)} is not in the step "
                                                        f"index: {problem}")
    for name, value in request.query_params.items():
        problem = text_problem(value)
        if problem:
            raise HTTPException(status_code=400, detail=f"query parameter {name!r}: {problem}")
    return user


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _render(request: Request, template: str, user: Any, **context: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, template, {"root": _root(request), "user": user.get_name(),
                                                          "q": quote, **context})


def _png(content: bytes) -> Response:
    return Response(content, media_type="image/png", headers={"Cache-Control": "private, max-age=30"})


def create_app(settings_factory=get_settings) -> FastAPI:
    """The browser app; ``settings_factory`` gives the :class:`Settings` it reads (the process's
    ``MMPRM_*`` environment by default)."""
    app = FastAPI(title="MM-PRM annotation browser", docs_url=None, redoc_url=None, openapi_url=None)

    def settings() -> Settings:
        return settings_factory()

    @app.exception_handler(StarletteHTTPException)
    async def _errors(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 401 and _wants_html(request):
            # A browser with no (or an expired) session goes to Airflow's login and comes back.
            from airflow.api_fastapi.app import get_auth_manager

            target = str(request.url.path) + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(get_auth_manager().get_url_login(next_url=target), status_code=303)
        if _wants_html(request):
            return HTMLResponse(TEMPLATES.get_template("error.html").render(
                root=_root(request), status=exc.status_code, detail=exc.detail), status_code=exc.status_code)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        # 400 with the first problem in one line (FastAPI's default: 422 with a JSON list).
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        return await _errors(request, StarletteHTTPException(400, f"{where}: {error.get('msg', 'invalid')}"))

    @app.exception_handler(data.NotFound)
    async def _not_found(request: Request, exc: data.NotFound):
        return await _errors(request, StarletteHTTPException(404, f"{exc.args[0]} is not in the step index"))

    reader = Depends(require_valid_url)

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request, user=reader):
        return _render(request, "index.html", user, **data.overview(settings()))

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: str, offset: int = Query(0, ge=0, le=MAX_OFFSET), user=reader):
        return _render(request, "run.html", user, **data.run_view(settings(), run_id, offset=offset))

    @app.get("/runs/{run_id}/mc-histogram.png")
    def run_mc_histogram(run_id: str, user=reader):
        from ..annotate import run_summary

        s = settings()
        data.require_run(s, run_id)
        return _png(charts.mc_histogram_png(run_summary(s, run_id)["mc_histogram"]))

    @app.get("/runs/{run_id}/first-errors.png")
    def run_first_errors(run_id: str, user=reader):
        s = settings()
        data.require_run(s, run_id)
        return _png(charts.first_error_png(data.first_error_positions(s, run_id)))

    @app.get("/runs/{run_id}/problems/{problem_id}", response_class=HTMLResponse)
    def tree_page(request: Request, run_id: str, problem_id: str, user=reader):
        return _render(request, "tree.html", user, run_id=run_id, **data.tree_view(settings(), run_id, problem_id))

    @app.get("/problems/{problem_id}", response_class=HTMLResponse)
    def problem_page(request: Request, problem_id: str, user=reader):
        return _render(request, "problem.html", user, **data.problem_view(settings(), problem_id))

    @app.get("/problems/{problem_id}/image")
    def problem_image(problem_id: str, user=reader):
        content, media_type = data.problem_image(settings(), problem_id)
        return Response(content, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/datasets/{dataset_id}", response_class=HTMLResponse)
    def dataset_page(request: Request, dataset_id: str, user=reader):
        return _render(request, "dataset.html", user, **data.dataset_view(settings(), dataset_id))

    @app.get("/checkpoints/{checkpoint_id}", response_class=HTMLResponse)
    def checkpoint_page(request: Request, checkpoint_id: str, user=reader):
        return _render(request, "checkpoint.html", user, **data.checkpoint_view(settings(), checkpoint_id))

    @app.get("/checkpoints/{checkpoint_id}/loss.png")
    def checkpoint_loss_curve(checkpoint_id: str, user=reader):
        return _png(charts.loss_curve_png(data.checkpoint_loss(settings(), checkpoint_id)))

    @app.get("/evaluations/{evaluation_id}", response_class=HTMLResponse)
    def evaluation_page(request: Request, evaluation_id: str, user=reader):
        s = settings()
        view = data.evaluation_view(s, evaluation_id)
        return _render(request, "evaluation.html", user, **view,
                       standing=data.evaluation_standing(s, evaluation_id, view["report"]))

    @app.get("/evaluations/{evaluation_id}/plot.png")
    def evaluation_plot(evaluation_id: str, user=reader):
        return _png(data.evaluation_plot(settings(), evaluation_id))

    @app.get("/evaluations/{evaluation_id}/curve.png")
    def evaluation_curve(evaluation_id: str, user=reader):
        """The shipped curve of PRM quality against annotated paths with this evaluation's PRM on it."""
        from ..scaling_curve import plot_curve_png

        standing = data.evaluation_standing(settings(), evaluation_id)
        if standing["curve"] is None:
            raise HTTPException(status_code=404, detail=standing["note"])
        return _png(plot_curve_png(standing["curve"], standing["point"]))

    @app.get("/evaluations/{evaluation_id}/problems/{problem_id}", response_class=HTMLResponse)
    def evaluation_problem_page(request: Request, evaluation_id: str, problem_id: str, scorer: str | None = None,
                                user=reader):
        return _render(request, "candidates.html", user,
                       **data.evaluation_problem_view(settings(), evaluation_id, problem_id, scorer))

    @app.get("/dag-runs/{dag_id}/{run_id}", response_class=HTMLResponse)
    def dag_run_page(request: Request, dag_id: str, run_id: str, user=reader):
        """The DAG run page's Annotation tab: an annotation DAG run goes straight to its annotation
        run; any other run shows what it made (seeds ingested and rejected, dataset, checkpoint,
        evaluation), reloading only until the DAG run has finished."""
        from .airflow_runs import dag_run_outputs

        outputs = dag_run_outputs(dag_id, run_id)
        annotation_runs = [ident for page, ident in outputs.made if page == "runs"]
        if annotation_runs:
            return RedirectResponse(f"{_root(request)}/runs/{quote(annotation_runs[0], safe='')}", status_code=303)
        return _render(request, "dag_run.html", user, dag_id=dag_id, run_id=run_id, outputs=outputs)

    return app


app = create_app()
