// promptgate status page: polls the admin JSON with the operator's key and
// draws it. Every value reaches the page as text (textContent), never as HTML.
'use strict';
(function () {
  const KEY = 'promptgate.adminKey';
  // `?refresh=SECONDS` (0.5 to 60) changes the polling interval (default 2 s).
  const POLL_MS = (() => {
    const v = Number(new URLSearchParams(window.location.search).get('refresh'));
    return v >= 0.5 && v <= 60 ? v * 1000 : 2000;
  })();
  const STALE_MS = Math.max(6000, 3 * POLL_MS);
  const TIMEOUT_MS = 5000;
  const $ = (id) => document.getElementById(id);

  let key = null;
  let timer = null;
  let clock = null;
  let lastOk = 0;
  let lastError = null;
  let running = false;

  // --- DOM helpers ---------------------------------------------------------

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else e.setAttribute(k, String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      e.append(kid instanceof Node ? kid : String(kid));
    }
    return e;
  }
  const badge = (text, kind, attrs) => el('span', Object.assign({ class: 'badge ' + kind }, attrs || {}), text);
  const muted = (text) => el('div', { class: 'sub-line' }, text);
  const empty = (text) => el('p', { class: 'empty' }, text);

  function table(headers, rows) {
    const head = el('tr', null, headers.map((h) => {
      const num = h.startsWith('#');
      return el('th', { class: num ? 'num' : null, scope: 'col' }, num ? h.slice(1) : h);
    }));
    return el('div', { class: 'scroll' }, el('table', null, el('thead', null, head), el('tbody', null, rows)));
  }
  const td = (...kids) => el('td', null, kids);
  const num = (...kids) => el('td', { class: 'num' }, kids);

  function kv(pairs) {
    return el('dl', { class: 'kv' }, pairs.filter(Boolean).map(([k, v]) => [el('dt', null, k), el('dd', null, v)]));
  }

  function fill(card, ...nodes) {
    const body = $(card).querySelector('.body');
    // Keep each table's horizontal scroll position across refreshes.
    const kept = Array.from(body.querySelectorAll('.scroll')).map((s) => s.scrollLeft);
    body.replaceChildren(...nodes.flat().filter(Boolean));
    body.querySelectorAll('.scroll').forEach((s, i) => { if (kept[i]) s.scrollLeft = kept[i]; });
  }

  // --- formatting ----------------------------------------------------------

  const pad = (n) => String(n).padStart(2, '0');
  function time(unix) {
    if (!unix) return 'never';
    const d = new Date(unix * 1000);
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' +
      pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }
  function clockTime(ms) {
    const d = new Date(ms);
    return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
  }
  function ago(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + ' s ago';
    if (seconds < 3600) return Math.floor(seconds / 60) + ' min ago';
    if (seconds < 86400) return Math.floor(seconds / 3600) + ' h ago';
    return Math.floor(seconds / 86400) + ' d ago';
  }
  const pct = (x) => (x === null || x === undefined || !isFinite(x)) ? '–' : (x * 100).toFixed(x > 0 && x < 0.1 ? 1 : 0) + '%';
  const int = (n) => (n === null || n === undefined) ? '–' : Number(n).toLocaleString('en-US');
  const ms = (x) => (x === null || x === undefined) ? '–' : (x >= 1000 ? (x / 1000).toFixed(2) + ' s' : Math.round(x) + ' ms');
  function money(x, cur) {
    if (x === null || x === undefined) return '–';
    x = Number(x);
    const text = x === 0 ? '0' : x >= 1 ? x.toFixed(2) : x >= 0.01 ? x.toFixed(4) : x.toPrecision(2);
    return text + (cur ? ' ' + cur : '');
  }
  function bytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
  }

  const BREAKER = { closed: ['closed', 'ok'], open: ['open', 'bad'], half_open: ['half-open', 'warn'] };
  function breakerBadge(t) {
    const [text, kind] = BREAKER[t.breaker] || [String(t.breaker), 'off'];
    return badge('breaker ' + text, kind, { 'data-target': t.target, 'data-breaker': t.breaker });
  }
  function errorRate(t) {
    const kind = t.recent_calls === 0 ? 'off' : t.recent_error_rate >= 0.5 ? 'bad' : t.recent_error_rate > 0 ? 'warn' : 'ok';
    return el('span', { class: 'sub-line', title: 'errors among the recent calls' },
      t.recent_calls === 0 ? 'no recent calls' : pct(t.recent_error_rate) + ' errors of ' + int(t.recent_calls), kind === 'bad' ? ' ⚠' : '');
  }

  // --- the cards -----------------------------------------------------------

  function allTargets(s) {
    const seen = new Map();
    for (const r of s.routes) {
      const chains = r.strategy === 'split' ? r.arms.map((a) => a.targets) : [r.targets];
      for (const c of chains) for (const t of c) if (!seen.has(t.target)) seen.set(t.target, t);
    }
    return Array.from(seen.values());
  }

  function hitRate(routes) {
    let hits = 0, misses = 0;
    for (const r of Object.values(routes || {})) { hits += r.hits; misses += r.misses; }
    return hits + misses === 0 ? null : hits / (hits + misses);
  }

  function currentReloadError(cfg) {
    const e = cfg.last_error;
    return e && e.at >= cfg.last_good_reload ? e : null;
  }

  function summary(s) {
    const ready = s.providers.filter((p) => p.state === 'ready').length;
    const targets = allTargets(s);
    const open = targets.filter((t) => t.breaker === 'open').length;
    const half = targets.filter((t) => t.breaker === 'half_open').length;
    const reloadErr = currentReloadError(s.config);
    const rate = hitRate(s.cache.routes);
    const tile = (k, v, kind) => el('div', { class: 'tile ' + kind }, el('div', { class: 'k' }, k), el('div', { class: 'v' }, v));
    $('summary').replaceChildren(
      tile('Providers ready', ready + ' / ' + s.providers.length, ready === s.providers.length ? 'ok' : 'warn'),
      tile('Breakers open', open + (half ? ' (+' + half + ' half-open)' : ''), open ? 'bad' : half ? 'warn' : 'ok'),
      tile('Drill faults', String(s.faults.length), s.faults.length ? 'warn' : 'ok'),
      tile('Last reload', reloadErr ? 'failed' : 'ok', reloadErr ? 'bad' : 'ok'),
      tile('Cache hit rate', pct(rate), rate === null ? 'off' : 'ok'),
      tile('Routes', String(s.routes.length), 'off'),
    );
    const alerts = [];
    if (reloadErr) {
      alerts.push(el('div', { class: 'alert' }, 'The last reload was rejected (' + reloadErr.problems.length +
        ' problem' + (reloadErr.problems.length === 1 ? '' : 's') + ', see Configuration); the previous configuration keeps serving.'));
    }
    for (const t of targets.filter((x) => x.breaker === 'open')) {
      alerts.push(el('div', { class: 'alert' }, 'Breaker open: ', el('code', null, t.target), ' is skipped until its cooldown ends.'));
    }
    for (const f of s.faults) {
      alerts.push(el('div', { class: 'alert warn' }, 'Drill fault on ', el('code', null, f.provider), ': ' + f.fault +
        ' (ends in ' + Math.ceil(f.expires_in_ms / 1000) + ' s)'));
    }
    $('alerts').replaceChildren(...alerts);
  }

  function providers(s) {
    const targets = allTargets(s);
    const rows = s.providers.map((p) => {
      const state = p.state === 'ready' ? badge('ready', 'ok') : badge('unavailable', 'bad');
      const rotation = [];
      if (p.draining) rotation.push(badge('draining', 'warn'));
      if (p.fault) rotation.push(badge('fault: ' + p.fault, 'bad'));
      if (!rotation.length) rotation.push(badge('in rotation', 'ok'));
      const health = targets.filter((t) => t.provider === p.id).map((t) =>
        el('div', { class: 'arm' }, el('code', null, t.model), breakerBadge(t), errorRate(t)));
      return el('tr', { 'data-provider': p.id },
        td(el('div', { class: 'arm' }, el('strong', null, p.id), el('span', { class: 'sub-line' }, p.kind || '')),
          el('div', { class: 'arm' }, state, rotation), p.reason ? el('div', { class: 'sub-line reason' }, p.reason) : null),
        td(health.length ? health : muted('not used by a route')));
    });
    fill('card-providers', rows.length ? table(['Provider: state, rotation', 'Targets: breaker, recent errors'], rows) : empty('No providers.'));
  }

  function chain(targets) {
    return el('ol', { class: 'chain' }, targets.map((t) =>
      el('li', { 'data-chain-target': t.target }, el('code', null, t.target), breakerBadge(t), errorRate(t))));
  }

  function routes(s) {
    const rows = s.routes.map((r) => el('tr', null,
      td(el('strong', null, r.name), r.private ? [' ', badge('private', 'off')] : null),
      td(r.strategy === 'split' ? 'split' : r.targets.length > 1 ? 'fallback' : 'single'),
      el('td', { class: 'wrap' }, r.strategy === 'split'
        ? r.arms.map((a) => el('div', { class: 'arm' }, el('span', { class: 'arm-name' }, a.arm), chain(a.targets)))
        : chain(r.targets))));
    fill('card-routes', rows.length ? table(['Route', 'Strategy', 'Chain (in order) / split arms'], rows) : empty('No routes.'));
  }

  function prompts(s) {
    const rows = s.prompts.map((p) => {
      const labels = Object.entries(p.labels || {}).map(([l, v]) => el('div', null, badge(l + ' → v' + v, 'off')));
      return el('tr', null,
        el('td', { class: 'wrap' }, el('strong', null, p.id), el('div', { class: 'sub-line path' }, p.file)),
        td(p.versions.map((v) => el('div', null, 'v' + v.version + ' ', el('code', null, v.hash || '–'), v.route ? muted('route ' + v.route) : null))),
        td(labels.length ? labels : muted('no labels')));
    });
    fill('card-prompts', rows.length ? table(['Prompt', 'Versions', 'Labels'], rows) : empty('No prompts configured.'));
  }

  function cache(s) {
    const c = s.cache;
    const used = c.max_bytes ? Math.min(1, c.bytes / c.max_bytes) : 0;
    const bar = el('span');
    bar.style.width = (used * 100).toFixed(1) + '%';
    const routeRows = Object.entries(c.routes || {}).map(([name, r]) => el('tr', null,
      td(name), td(r.mode), num(int(r.hits)), num(int(r.misses)), num(int(r.bypasses)),
      num(pct(r.hits + r.misses ? r.hits / (r.hits + r.misses) : null))));
    const redis = c.redis ? Object.entries(c.redis.errors).filter(([, n]) => n > 0).map(([k, n]) => k + ' ' + n).join(', ') || 'no errors' : null;
    fill('card-cache',
      kv([
        ['Hit rate', pct(hitRate(c.routes))],
        ['Entries', int(c.entries)],
        ['Memory', [bytes(c.bytes) + ' of ' + bytes(c.max_bytes), el('div', { class: 'bar' }, bar)]],
        ['Evictions', int(c.evictions)],
        redis && ['Redis tier', redis],
      ]),
      routeRows.length ? [el('h3', null, 'Per route'), table(['Route', 'Mode', '#Hits', '#Misses', '#Bypasses', '#Hit rate'], routeRows)]
        : muted('No route caches.'));
  }

  function config(s) {
    const c = s.config;
    const e = c.last_error;
    let error = null;
    if (e) {
      const current = currentReloadError(c);
      error = el('div', { id: 'reload-error', 'data-current': current ? 'yes' : 'no' },
        el('h3', null, 'Last reload error ', current ? badge('rejected', 'bad') : badge('fixed since', 'ok')),
        muted(time(e.at) + ' (' + ago(s.now - e.at) + '), trigger: ' + e.trigger),
        current ? null : el('div', { class: 'resolved' }, 'A later reload succeeded: the configuration serving now is valid.'),
        el('ul', { class: 'problems' }, e.problems.map((p) => el('li', null,
          el('span', { class: 'where' }, p.file + (p.line ? ':' + p.line : '')), ' ',
          p.field ? el('span', { class: 'field' }, p.field) : null, p.field ? ' — ' : '', p.message))));
    }
    fill('card-config',
      kv([
        ['File', el('code', null, c.file)],
        ['Loaded', time(c.loaded_at) + ' (' + ago(s.now - c.loaded_at) + ')'],
        ['Last good reload', time(c.last_good_reload)],
        ['Reloads', int(c.reloads.succeeded) + ' succeeded, ' + int(c.reloads.failed) + ' failed'],
      ]),
      error);
  }

  function experiments(x) {
    if (!x) { fill('card-experiments', empty('Experiment figures are not available right now.')); return; }
    const cur = x.currency;
    const arms = [];
    for (const e of x.experiments) {
      for (const a of e.arms) {
        arms.push(el('tr', null, td(el('strong', null, e.route)), td(a.arm), num(pct(a.weight)), td(a.prompt || '–'),
          num(int(a.requests)), num(int(a.errors) + ' (' + pct(a.error_rate) + ')'), num(ms(a.latency_p50_ms)), num(ms(a.latency_p95_ms)),
          num(int(a.tokens)), num(money(a.cost, cur))));
      }
    }
    const shadows = x.shadows.map((c) => el('tr', null, td(el('strong', null, c.route)), td(c.arm || '–'), td(el('code', null, c.candidate)),
      num(int(c.pairs)), num(int(c.primary_errors) + ' / ' + int(c.candidate_errors)),
      num(ms(c.primary_latency_p50_ms) + ' / ' + ms(c.candidate_latency_p50_ms)),
      num(ms(c.primary_latency_p95_ms) + ' / ' + ms(c.candidate_latency_p95_ms)),
      num(int(c.primary_tokens) + ' / ' + int(c.candidate_tokens)),
      num(money(c.primary_cost, cur) + ' / ' + money(c.candidate_cost, cur)),
      num(pct(c.similarity_p50))));
    fill('card-experiments',
      el('h3', null, 'A/B splits'),
      arms.length ? table(['Route', 'Arm', '#Weight', 'Prompt', '#Requests', '#Errors', '#p50', '#p95', '#Tokens', '#Cost'], arms) : empty('No split routes.'),
      el('h3', null, 'Shadow candidates (primary / candidate)'),
      shadows.length ? table(['Route', 'Arm', 'Candidate', '#Pairs', '#Errors', '#p50', '#p95', '#Tokens', '#Cost', '#Similarity p50'], shadows) : empty('No shadow candidates.'));
  }

  function keys(s) {
    const k = s.keys;
    const on = k && (k.count > 0 || k.mode === 'required');
    $('card-keys').hidden = !on;
    if (!on) return;
    const rate = (u, name, limit) => {
      if (limit === null || limit === undefined) return '';
      const r = u && u.limits && u.limits[name];
      return name + ' ' + (r && r.remaining !== undefined ? int(r.remaining) + ' left of ' : '') + int(limit);
    };
    const budget = (b, used) => b ? [b.cost !== null && b.cost !== undefined ? money(used && used.cost, '') + ' of ' + money(b.cost, '') : '',
      b.tokens !== null && b.tokens !== undefined ? int(used && used.tokens) + ' of ' + int(b.tokens) + ' tokens' : ''].filter(Boolean).join(', ') : null;
    const rows = (k.list || []).map((c) => {
      const u = c.usage || {};
      const sp = u.spend || {};
      const state = c.expired ? badge('expired', 'bad') : c.enabled ? badge('enabled', 'ok') : badge('disabled', 'off');
      const limits = [rate(u, 'rpm', c.limits.rpm), rate(u, 'tpm', c.limits.tpm),
        c.limits.concurrency ? 'concurrency ' + c.limits.concurrency : ''].filter(Boolean);
      const b = c.budget || {};
      const day = sp.day || {};
      const month = sp.month || {};
      return el('tr', null,
        td(el('strong', null, c.id), muted([c.owner, c.team].filter(Boolean).join(' · '))),
        td(state, c.expires ? muted('expires ' + c.expires) : null),
        td(limits.length ? limits.map((l) => el('div', null, l)) : muted('no limits')),
        num(money(day.cost, sp.currency), muted(int(day.tokens) + ' tokens'), b.daily ? muted('budget ' + budget(b.daily, day)) : null),
        num(money(month.cost, sp.currency), muted(int(month.tokens) + ' tokens'), b.monthly ? muted('budget ' + budget(b.monthly, month)) : null));
    });
    fill('card-keys', muted('Auth mode ' + k.mode + ': ' + k.usable + ' usable, ' + k.expired + ' expired'),
      rows.length ? table(['Key', 'State', 'Limits', '#Spend today', '#Spend this month'], rows) : empty('No keys.'));
  }

  function render(s, x) {
    summary(s); providers(s); config(s); routes(s); prompts(s); cache(s); experiments(x); keys(s);
  }

  // --- talking to the gateway ---------------------------------------------

  async function api(path, withKey) {
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const headers = withKey ? { Authorization: 'Bearer ' + withKey } : {};
      const r = await fetch(path, { headers, cache: 'no-store', credentials: 'omit', signal: ctl.signal });
      let body = null;
      try { body = await r.json(); } catch (_) { body = null; }
      return { status: r.status, body, code: body && body.error ? body.error.code : null, message: body && body.error ? body.error.message : null };
    } finally {
      clearTimeout(t);
    }
  }
  const why = (err) => err && err.name === 'AbortError' ? 'no answer within ' + TIMEOUT_MS / 1000 + ' s' : 'the connection failed';

  function show(which) {
    for (const id of ['login', 'disabled', 'dash']) $(id).hidden = id !== which;
    $('conn').hidden = which !== 'dash';
    if (which !== 'dash') { $('banner').hidden = true; document.body.classList.remove('stale'); }
  }

  function showLogin(message) {
    stop();
    show('login');
    const e = $('login-error');
    e.textContent = message || '';
    e.hidden = !message;
    $('key').focus();
  }

  function showDisabled(message) {
    stop();
    key = null;
    sessionStorage.removeItem(KEY);
    if (message) $('disabled-text').textContent = message;
    show('disabled');
  }

  function updateConn() {
    const pill = $('conn-state');
    const age = lastOk ? (Date.now() - lastOk) : Infinity;
    const stale = lastError !== null || age > STALE_MS;
    if (document.hidden) { pill.textContent = 'paused'; pill.className = 'pill'; }
    else if (!stale) { pill.textContent = 'live'; pill.className = 'pill ok'; }
    else { pill.textContent = lastOk ? 'stale' : 'no answer'; pill.className = 'pill bad'; }
    $('updated').textContent = lastOk ? 'updated ' + clockTime(lastOk) + ' (' + ago(age / 1000) + ')' : 'not updated yet';
    const banner = $('banner');
    banner.hidden = !stale || document.hidden;
    if (stale) {
      banner.textContent = 'The gateway is not answering (' + (lastError || 'no update for ' + Math.round(age / 1000) + ' s') + ').' +
        (lastOk ? ' Showing the data of ' + clockTime(lastOk) + '.' : '');
    }
    document.body.classList.toggle('stale', stale && !document.hidden);
  }

  function stop() {
    running = false;
    clearTimeout(timer);
    clearInterval(clock);
    timer = clock = null;
  }

  function schedule() {
    clearTimeout(timer);
    if (running && !document.hidden) timer = setTimeout(tick, POLL_MS);
  }

  async function tick() {
    clearTimeout(timer);
    if (!running || document.hidden) return;
    try {
      const [s, x] = await Promise.all([api('/admin/status', key), api('/admin/experiments', key)]);
      if (!running) return;
      if (s.status === 401 || x.status === 401) { signOut('The gateway no longer accepts this key. Sign in again.'); return; }
      if (s.code === 'admin_disabled') { showDisabled(s.message); return; }
      if (s.status !== 200 || !s.body) throw new Error('answered HTTP ' + s.status + (s.message ? ': ' + s.message : ''));
      lastOk = Date.now();
      lastError = null;
      render(s.body, x.status === 200 ? x.body : null);
    } catch (err) {
      lastError = err instanceof Error && err.message.startsWith('answered') ? err.message : why(err);
    }
    updateConn();
    schedule();
  }

  function startDash() {
    show('dash');
    running = true;
    lastOk = 0;
    lastError = null;
    updateConn();
    clearInterval(clock);
    clock = setInterval(updateConn, 1000);
    tick();
  }

  function signOut(message) {
    stop();
    key = null;
    sessionStorage.removeItem(KEY);
    showLogin(message);
  }

  async function submit(ev) {
    ev.preventDefault();
    const given = $('key').value.trim();
    if (!given) { showLogin('Enter the admin key.'); return; }
    const button = $('login-submit');
    button.disabled = true;
    try {
      const r = await api('/admin/status', given);
      if (r.status === 200) {
        key = given;
        sessionStorage.setItem(KEY, key);
        $('key').value = '';
        startDash();
      } else if (r.code === 'admin_disabled') {
        showDisabled(r.message);
      } else if (r.status === 401) {
        $('key').value = '';
        showLogin('The gateway refused this key. Check the value of the admin key variable and try again.');
      } else {
        showLogin('The gateway answered HTTP ' + r.status + (r.message ? ': ' + r.message : '') + '.');
      }
    } catch (err) {
      showLogin('The gateway did not answer (' + why(err) + '). Try again.');
    } finally {
      button.disabled = false;
    }
  }

  async function boot() {
    $('login-form').addEventListener('submit', submit);
    $('signout').addEventListener('click', () => signOut('Signed out. The key was removed from this tab.'));
    document.addEventListener('visibilitychange', () => {
      if (!running) return;
      updateConn();
      if (document.hidden) clearTimeout(timer);
      else tick();
    });
    key = sessionStorage.getItem(KEY);
    if (key) { startDash(); return; }
    // Without a key: a disabled admin API says so; otherwise ask for the key.
    try {
      const r = await api('/admin/status', null);
      if (r.code === 'admin_disabled') { showDisabled(r.message); return; }
    } catch (_) { /* the form tells when the gateway does not answer */ }
    showLogin('');
  }

  document.addEventListener('DOMContentLoaded', boot);
})();
