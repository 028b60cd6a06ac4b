(function () {
  var table = document.getElementById("cases"), body = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells).filter(function (h) {
    return h.hasAttribute("data-column");
  });
  function key(row, index) {
    var text = row.cells[index].getAttribute("data-value");
    if (text === null) { text = row.cells[index].textContent; }
    text = text.trim();
    return text === "" ? null : (/^-?\d+(\.\d+)?(e[-+]?\d+)?$/i.test(text) ? parseFloat(text) : text);
  }
  function show(name, shown) {  // a column of the chooser (#columns), shown or hidden
    document.querySelectorAll('[data-column="' + CSS.escape(name) + '"]').forEach(function (cell) {
      cell.hidden = !shown;
    });
    var box = document.querySelector('input[data-show="' + CSS.escape(name) + '"]');
    if (box) { box.checked = shown; }
  }
  document.querySelectorAll("input[data-show]").forEach(function (box) {
    box.addEventListener("change", function () { show(box.getAttribute("data-show"), box.checked); });
  });
  function sortBy(name, order) {
    var head = heads.find(function (h) { return h.getAttribute("data-column") === name; });
    if (!head) { return; }
    if (head.hidden) { show(name, true); }  // the column sorted on is shown
    var index = head.cellIndex;
    var rows = Array.prototype.slice.call(body.rows), sign = order === "desc" ? -1 : 1;
    rows.sort(function (a, b) {
      var x = key(a, index), y = key(b, index);
      if (x === y) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
      return (x < y ? -1 : 1) * sign;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
    head.setAttribute("aria-sort", order === "desc" ? "descending" : "ascending");
  }
  heads.forEach(function (h) {
    h.addEventListener("click", function () {
      var order = h.getAttribute("aria-sort") === "ascending" ? "desc" : "asc";
      sortBy(h.getAttribute("data-column"), order);
      history.replaceState(null, "", "#sort=" + h.getAttribute("data-column") + ":" + order);
    });
  });
  var wanted = /^#sort=([^:]+):(asc|desc)$/.exec(decodeURIComponent(location.hash));
  if (wanted) { sortBy(wanted[1], wanted[2]); }
  function checked(image) {
    image.setAttribute("data-loaded", image.complete && image.naturalWidth > 0 ? "yes" : "no");
    var broken = document.querySelectorAll("img[data-loaded=no]").length;
    var note = document.getElementById("pictures");
    note.textContent = broken ? broken + " QC picture(s) did not load" : "";
  }
  function watch(image) {
    if (image.complete) { checked(image); }
    else {
      image.addEventListener("load", function () { checked(image); });
      image.addEventListener("error", function () { checked(image); });
    }
  }
  function fetchPicture(image) {
    image.src = image.getAttribute("data-src");
    image.removeAttribute("data-src");
    watch(image);
  }
  var linked = Array.prototype.slice.call(document.querySelectorAll("img[data-src]"));
  Array.prototype.forEach.call(document.images, function (image) {
    if (!image.hasAttribute("data-src")) { watch(image); }
  });
  if (!("IntersectionObserver" in window)) { linked.forEach(fetchPicture); return; }
  var reach = window.innerHeight + 1000;  // px below the view fetched ahead
  var near = linked.filter(function (image) { return image.getBoundingClientRect().top < reach; });
  near.forEach(fetchPicture);
  var ahead = new IntersectionObserver(function (entries) {
    entries.forEach(function (entry) {
      if (entry.isIntersecting) { ahead.unobserve(entry.target); fetchPicture(entry.target); }
    });
  }, {rootMargin: "1000px 0px"});
  linked.forEach(function (image) { if (image.hasAttribute("data-src")) { ahead.observe(image); } });
})();
