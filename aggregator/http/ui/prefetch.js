// Runs before the charting library is fetched and parsed: keeps a read token given in the address
// (#token=..., see util.js) and removes it from there, then starts the requests of the run named in the
// address, so they overlap that work (app.js takes them over). A classic script on purpose.
(function () {
  var params = new URLSearchParams(location.hash.slice(1));
  var token = params.get('token');
  if (token) {
    sessionStorage.setItem('gradwatch.readToken', token.trim());
    params.delete('token');
    var rest = params.toString();
    history.replaceState(null, '', location.pathname + location.search + (rest ? '#' + rest : ''));
  }
  var run = params.get('run');
  if (!run) return;
  var base = '/api/v1/runs/' + encodeURIComponent(run);
  var kept = sessionStorage.getItem('gradwatch.readToken') || sessionStorage.getItem('gradwatch.apiToken');
  var headers = kept ? { Accept: 'application/json', Authorization: 'Bearer ' + kept } : { Accept: 'application/json' };
  var get = function (path) {
    return fetch(base + path, { headers: headers });
  };
  // The same paths app.js asks for (heatmap.js: the first window of PAGE rows and MAX_STEPS steps).
  window.gradwatchPrefetch = {
    run: run, topology: get('/topology?limit=10000'), layers: get('/layers?histograms=0&limit=5000'),
    alerts: get('/alerts'), heatmap: get('/heatmap?layer_offset=0&layer_limit=64&limit=500'),
  };
})();
