// Runs before the charting library is fetched and parsed: starts the requests of the run named in the
// address, so they overlap that work (app.js takes them over). A classic script on purpose.
(function () {
  var run = new URLSearchParams(location.hash.slice(1)).get('run');
  if (!run) return;
  var base = '/api/v1/runs/' + encodeURIComponent(run);
  var get = function (path) {
    return fetch(base + path, { headers: { Accept: 'application/json' } });
  };
  window.gradwatchPrefetch = { run: run, topology: get('/topology'), layers: get('/layers?histograms=0') };
})();
